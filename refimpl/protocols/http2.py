"""``GET /v1/h2/push-demo``: HTTP/2 server push, and the 103 Early Hints that replaced it.

Strategy
--------
A page needs its stylesheet, but the browser learns that only once the HTML
has arrived, and then pays one more round trip to ask for it.  HTTP has two
ways to start that fetch sooner.  This route uses both, so a reader can
watch which one a browser still accepts.

*Server push* (RFC 9113 §8.4).  While it answers a request, an HTTP/2 server
may promise a response nobody asked for: a PUSH_PROMISE frame on the
request's stream carries the request the server pretends the client made
(here ``GET /static/style.css``) and reserves a new, even-numbered stream
on which that response then travels as if it had been requested.  A client
can refuse push for the whole connection: once the server has acknowledged
its SETTINGS_ENABLE_PUSH = 0 (§6.5.2), a PUSH_PROMISE is a connection error.

Browsers gave push up.  A server cannot see the browser's cache, so it
pushes bytes the browser already has, and measurements showed no clear
gain.  Chrome 106 (2022) switched it off for Chromium browsers and sends
SETTINGS_ENABLE_PUSH = 0 on every connection instead
(https://developer.chrome.com/blog/removing-push; the intent to remove:
https://groups.google.com/a/chromium.org/g/blink-dev/c/K3rYLvmQUBY);
Firefox 132 (2024) turned it off by default (MDN's release note,
https://github.com/mdn/content/pull/36148).  The test watches Chromium say
ENABLE_PUSH = 0 to this server.

*103 Early Hints* (RFC 8297).  Before the final response the server sends an
informational 103 whose ``Link`` headers only *suggest* what to fetch
(``rel=preload``, RFC 8288); the browser checks its cache and fetches what
it lacks, as its own request.  A hint binds nobody: the final response
carries the headers it means, here the same ``Link``.  Chrome follows 103
for top-level navigations and ignores it over HTTP/1.1 (Chromium's
``docs/early-hints.md``).  For an LLM page the gain is the think time: the
hint leaves before the server has done any work on the request.

What hypercorn 0.18 and Quart 0.22 can do (read in their sources)
-----------------------------------------------------------------
* Push: Quart's ``make_push_promise(path)`` sends the ASGI message
  ``http.response.push`` if the scope offers that extension.  hypercorn
  offers it on HTTP/2 and 3 (``protocol/http_stream.py``: ``PUSH_VERSIONS =
  {"2", "3"}``), sends the PUSH_PROMISE and runs the app a second time for
  the promised request (``protocol/h2.py``, ``_create_server_push``).  If the
  client said ENABLE_PUSH = 0, h2's ``push_stream`` raises ``ProtocolError
  ("Remote peer has disabled stream push")`` and hypercorn swallows it
  (``except h2.exceptions.ProtocolError: # Client does not accept push
  promises ...  pass``): the push is skipped, and the app is not told.
* Early Hints: the ASGI message ``http.response.early_hint`` (``links``: a
  list of ``Link`` values) is offered on HTTP/2 and 3 only
  (``EARLY_HINTS_VERSIONS = {"2", "3"}``) and becomes a HEADERS frame with
  ``:status 103``.  Over HTTP/1.1 hypercorn cannot send a 103: the scope
  lacks the extension, the message would end in ``UnexpectedMessageError``,
  and ``protocol/h11.py`` drops the event anyway (``elif isinstance(event,
  InformationalResponse): pass  # Ignore for HTTP/1``).  As Chrome ignores a
  103 over HTTP/1.1, nothing is lost for browsers.  Quart has no helper for
  it, so the small ASGI middleware below sends it, before the app sees the
  request.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from quart import Quart, Response, make_push_promise, request

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

PUSH_DEMO = "/v1/h2/push-demo"
STYLESHEET = "/static/style.css"  # what the page needs, so what we push and hint
PRELOAD = f"<{STYLESHEET}>; rel=preload; as=style"  # one RFC 8288 link


class EarlyHints:
    """ASGI middleware: a 103 with ``Link`` hints for the paths that have
    some, sent *before* the app starts on the request (RFC 8297)."""

    def __init__(self, app: ASGIFramework, links: dict[str, list[str]]) -> None:
        self.app = app
        self.links = {path: [link.encode() for link in values] for path, values in links.items()}

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        links = self.links.get(scope.get("path", "")) if scope["type"] == "http" else None
        # Only where the server says it can (HTTP/2 and 3 in hypercorn 0.18).
        if links and "http.response.early_hint" in (scope.get("extensions") or {}):
            await send({"type": "http.response.early_hint", "links": links})
        await self.app(scope, receive, send)


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>refimpl: HTTP/2 server push and 103 Early Hints</title>
<link rel="stylesheet" href="{stylesheet}">
<h1>Server push, and what replaced it</h1>
<p id="protocol">You asked over HTTP/{version}.</p>
<p id="push">{push}</p>
<p id="hints">{hints}</p>
"""
OVER_H2 = (
    "The server promised to push {stylesheet} (a PUSH_PROMISE frame), unless your client"
    " sent SETTINGS_ENABLE_PUSH = 0, as Chromium since 106 and Firefox since 132 do:"
    " then the push was skipped."
)
OVER_H1 = "HTTP/{version} has no server push."
HINTS_H2 = "A 103 Early Hints response said <code>Link: {link}</code> before this page."
HINTS_H1 = "hypercorn sends no 103 over HTTP/1.1; only this page's own Link header hints."


def register(app: Quart) -> None:
    """Add ``GET /v1/h2/push-demo``: a page that pushes and hints its stylesheet."""
    app.asgi_app = EarlyHints(app.asgi_app, {PUSH_DEMO: [PRELOAD]})  # type: ignore[method-assign]

    @app.get(PUSH_DEMO)
    async def push_demo() -> Response:
        # RFC 9113 §8.4.1: promise *before* the response that refers to the
        # pushed resource, so the client cannot ask for it first.  Over
        # HTTP/1.1 this does nothing: the scope has no push extension.
        await make_push_promise(STYLESHEET)
        extensions = request.scope.get("extensions") or {}
        pushed = "http.response.push" in extensions  # what the server offers
        hinted = "http.response.early_hint" in extensions  # (EarlyHints used it)
        version = request.http_version
        page = PAGE.format(
            stylesheet=STYLESHEET,
            version=version,
            push=(OVER_H2 if pushed else OVER_H1).format(stylesheet=STYLESHEET, version=version),
            hints=(HINTS_H2 if hinted else HINTS_H1).format(link=escape(PRELOAD)),
        )
        # The final response repeats the hint: a 103 is advice, this is the answer.
        return Response(page, content_type="text/html; charset=utf-8", headers={"Link": PRELOAD})
