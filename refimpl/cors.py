"""CORS: let a page served from elsewhere call this server (``--cors-origin``).

Strategy
--------
A browser lets a page read a response from another origin (scheme, host and
port) only if the response says so: the CORS protocol of the Fetch standard
(§3.2).  A request a plain HTML form could not send -- a POST with a JSON
body, or one with an ``Authorization``, ``x-api-key`` or ``Last-Event-ID``
header -- is first *preflighted*: the browser sends ``OPTIONS`` with
``Origin`` and ``Access-Control-Request-Method`` / ``-Headers``, and sends the
real request only if the answer allows that origin, method and those
headers.  The real response must then allow the origin again
(``Access-Control-Allow-Origin``) and name every header the page may read
beyond a few safe ones (``Access-Control-Expose-Headers``: ``X-Request-Id``
for the trace, ``Location`` and ``Retry-After``, and gRPC-Web's status
headers).  An origin that is not listed gets no CORS header at all, so the
browser blocks the page; every answer carries ``Vary: Origin``, so a cache
never hands one origin's answer to another.

Why not a library.  ``quart-cors`` (by Quart's author) works on quart-trio,
but as Quart hooks: it never sees the gRPC/Connect paths, which connectrpc
answers in front of Quart (``grpc_chat.asgi``), and its WebSocket hook
refuses, with 400, every origin not listed -- the server's own page too,
once ``--cors-origin`` names another.  Starlette's ``CORSMiddleware`` is
ASGI and would see every path, but it adds ``Access-Control-Expose-Headers``
for any origin, listed or not, and would make Starlette a dependency for
sixty lines.  So this is a small ASGI middleware in front of everything:
Quart's routes, and Connect and gRPC-Web from a browser (their request
headers, ``Connect-Protocol-Version``, ``X-Grpc-Web``..., and their status
headers, ``Grpc-Status``...).
WebSocket handshakes pass untouched: CORS does not apply to them (a browser
opens a socket to any origin), and the key a socket needs is never sent by
the browser on its own, as a cookie would be, so a foreign page gains nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from .jsonwire import dumps_ascii
from .patterns.errors import error_body

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

# region: cors-headers
#: Request headers a page may send: any (``*``; our JSON's Content-Type,
#: x-api-key, Last-Event-ID, Connect's and gRPC-Web's, the x-stainless-*
#: of the openai JS SDK), and Authorization, which the wildcard never covers
#: (Fetch §3.2.3): it must be named.  The wildcard is safe because these
#: requests carry no cookies (no "credentials" mode), only the key.
ALLOW_HEADERS = "authorization, *"
#: Response headers a page may read beyond the CORS-safelisted ones.
EXPOSE_HEADERS = (
    "X-Request-Id, Location, Retry-After, retry-after-ms, Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin"
)
ALLOW_METHODS = "GET, POST"
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer
# endregion: cors-headers


def middleware(app: ASGIApp, origins: Iterable[str]) -> ASGIApp:
    """``app`` behind CORS for ``origins`` (``"*"``: any); none: ``app`` itself."""
    allowed = frozenset(origins)
    if not allowed:
        return app

    def allows(origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, if any."""
        if origin is None:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    # region: cors-middleware
    async def cors(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # WebSocket (see above), lifespan
            return await app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get(b"origin")
        allow = allows(origin)
        if (
            scope["method"] == "OPTIONS"
            and origin is not None
            and b"access-control-request-method" in headers
        ):
            return await preflight(allow, send)

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"vary", b"Origin")]
                if allow is not None:
                    extra += [
                        (b"access-control-allow-origin", allow.encode("latin-1")),
                        (b"access-control-expose-headers", EXPOSE_HEADERS.encode()),
                    ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await app(scope, receive, send_with_cors)

    # endregion: cors-middleware

    return cors


async def preflight(allow: str | None, send: Callable) -> None:
    """Answer a preflight: allowed (204 and the headers), or refused (403,
    and no CORS header, so the browser does not send the real request)."""
    headers = [(b"vary", b"Origin")]
    if allow is None:
        body = dumps_ascii(
            error_body("This origin may not call this server.", "invalid_request_error", "origin_not_allowed")
        ).encode()
        headers.append((b"content-type", b"application/json"))
        status = 403
    else:
        body = b""
        status = 204
        headers += [
            (b"access-control-allow-origin", allow.encode("latin-1")),
            (b"access-control-allow-methods", ALLOW_METHODS.encode()),
            (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
            (b"access-control-max-age", MAX_AGE.encode()),
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
