"""API keys: one check, every protocol (``REFIMPL_API_KEY``, lesson 14).

Strategy
--------
When ``Config.api_keys`` is not empty, every request must present one of the
keys, the way OpenAI's API wants it: a *bearer token* (RFC 6750), the key
itself in ``Authorization: Bearer <key>`` (§2.1).  Each protocol says
"no" in its own words, from the same check (:meth:`Keys.allows`):

* HTTP: 401 in the OpenAI error shape (``invalid_api_key``) with a
  ``WWW-Authenticate: Bearer`` challenge (RFC 6750 §3; ``error=
  "invalid_token"`` only when a key was sent but is wrong, §3.1).  The
  Anthropic SDK sends ``x-api-key: <key>`` instead, so that header counts too.
* WebSocket: a browser's ``new WebSocket(url, protocols)`` cannot set any
  header, so the key may also ride as a subprotocol token, in the form the
  OpenAI SDK uses for its Realtime API in a browser:
  ``openai-insecure-api-key.<key>`` offered beside a real subprotocol name,
  which the server picks (``insecure``: the key is in the page, for demos
  and trusted clients only); or as ``?api_key=<key>`` (it lands in access
  logs: the last resort).  A refused socket is accepted and then closed with
  1008, "policy violation" (RFC 6455 §7.4.1), and a reason: a handshake
  refused with 401 reaches browser JavaScript only as a bare 1006.
* gRPC / Connect: ``authorization: Bearer <key>`` metadata, refused with
  ``UNAUTHENTICATED`` (the status ``patterns/errors.py`` maps 401 to)
  before the request message is read (:class:`GrpcKeyCheck`).

Paths in ``Config.public_paths`` are answered without a key (``/`` and
``/metrics`` by default, ``--public-path``; ``/static/*`` too, a trailing
``*`` is a prefix): the demo page and its scripts are the same code anyone
can read in the package, and a ``<script src>`` cannot carry a key.
``/v1/models`` is not public, as on OpenAI: with ``--upstream`` it lists
what the upstream serves, and every SDK sends its key there anyway.

Why constant time.  ``presented == key`` stops at the first byte that
differs, so the time it takes tells an attacker how many leading bytes they
guessed right, and they can learn a key byte by byte.
``hmac.compare_digest`` takes the same time wherever the bytes differ; we
compare SHA-256 digests, so the lengths are equal too and the time does not
even reveal the key's length; and we compare against *every* key with no
early exit, so the time does not reveal which key matched, or whether one did.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .patterns.errors import APIError

if TYPE_CHECKING:
    from quart import Quart

    from .config import Config

#: The subprotocol prefix that carries a key from a browser (OpenAI's form).
KEY_PROTOCOL = "openai-insecure-api-key."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


# region: constant-time-check
class Keys:
    """The accepted keys, and which paths need none."""

    def __init__(self, keys: Iterable[str], public_paths: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in keys]
        self._public = [p for p in public_paths if not p.endswith("*")]
        self._public_prefixes = tuple(p[:-1] for p in public_paths if p.endswith("*"))

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def is_public(self, path: str) -> bool:
        return path in self._public or path.startswith(self._public_prefixes)

    def allows(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys, in time that depends on
        neither the key's bytes, its length, nor which key it is."""
        if not self._digests:
            return True
        given = _digest(presented or "")
        match = False
        for digest in self._digests:  # every key, no early exit
            match |= hmac.compare_digest(given, digest)
        return match and presented is not None


# endregion: constant-time-check


# region: where-the-key-is
def bearer(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme is
    case-insensitive, RFC 9110 §11.1), else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def http_key(headers: Any) -> str | None:
    """The key an HTTP request presents: a bearer token, else ``x-api-key``."""
    return bearer(headers.get("authorization")) or headers.get("x-api-key") or None


def websocket_key(headers: Any, query_string: bytes, subprotocols: list[str]) -> str | None:
    """The key a WebSocket handshake presents: a header (as over HTTP), a
    ``openai-insecure-api-key.<key>`` subprotocol, or ``?api_key=``."""
    if key := http_key(headers):
        return key
    for offered in subprotocols:
        if offered.startswith(KEY_PROTOCOL):
            return offered[len(KEY_PROTOCOL) :]
    return parse_qs(query_string.decode("latin-1")).get("api_key", [None])[0]


def chosen_subprotocol(subprotocols: list[str]) -> str | None:
    """The subprotocol to accept: the first one offered that is not a key.
    A browser that offers subprotocols fails the connection unless the
    server picks one of them (RFC 6455 §4.1), and echoing the key back would
    copy it into one more header."""
    return next((p for p in subprotocols if not p.startswith(KEY_PROTOCOL)), None)


# endregion: where-the-key-is


# region: refusals
def unauthorized(presented: str | None) -> APIError:
    """The 401 of a request without a good key, as OpenAI words it."""
    if presented is None:
        message = (
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'"
            " (or 'x-api-key: YOUR_KEY')."
        )
        challenge = 'Bearer realm="refimpl"'
    else:
        message = "Incorrect API key provided."  # never echo the key: it lands in logs
        challenge = 'Bearer realm="refimpl", error="invalid_token"'
    return APIError(
        401,
        message,
        code="invalid_api_key",
        type="invalid_request_error",
        headers={"WWW-Authenticate": challenge},
    )


def websocket_refusal(presented: str | None) -> str:
    """The reason of a WebSocket's close 1008 (at most 123 bytes, RFC 6455 §5.5)."""
    if presented is None:
        return (
            "invalid_api_key: no API key (send Authorization: Bearer KEY, a subprotocol token, or ?api_key=)"
        )
    return "invalid_api_key: incorrect API key provided"


def install(app: Quart, config: Config) -> Keys:
    """Check every HTTP request's key before its route runs.  (A WebSocket
    checks its own, ``websocket_chat.py``; gRPC has :class:`GrpcKeyCheck`.)"""
    from quart import request

    keys = Keys(config.api_keys, config.public_paths)
    if keys.required:

        @app.before_request
        async def require_key() -> None:
            if keys.is_public(request.path):
                return
            presented = http_key(request.headers)
            if not keys.allows(presented):
                raise unauthorized(presented)

    return keys


class GrpcKeyCheck:
    """A connectrpc metadata interceptor: it runs before the request message
    is read, so a call without a good key costs no parsing."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def on_start(self, ctx: Any) -> None:
        from .patterns.errors import grpc_error

        presented = bearer(ctx.request_headers.get("authorization"))
        if not self.keys.allows(presented):
            raise grpc_error(unauthorized(presented))

    async def on_end(self, token: None, ctx: Any, error: Exception | None) -> None:
        return None


# endregion: refusals
