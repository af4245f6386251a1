"""The access log: one line per request and per WebSocket turn on the server terminal.

Strategy
--------
A streamed response is not over when its status line is: the interesting
part (how many tokens, how soon the first, how it ended) is known only when
the generation ends.  So a request that made a generation is logged *then*,
from its trace, and every other request (the demo page, ``/metrics``, a 400
before any generation existed) when its response is made.  Each line::

    18:40:02 INFO sse POST /v1/chat/completions 200 chatcmpl-3f… 64 tokens ttft 203 ms 1.49 s done(stop)
    18:40:05 INFO http GET /metrics 200 1.2 ms

The status of a stream is the one sent before its first byte (200), however
it ended; the ending says the rest: ``done(stop)``, ``error(overloaded)``,
``cancelled(client_disconnect)``.  A WebSocket turn has no status of its
own (the socket's was 101), so it shows ``-``.

The lines go to the ``refimpl.access`` logger at INFO.  ``refimpl serve``
puts a handler on ``refimpl`` that prints INFO and above to stderr, with the
time in front, and
``--quiet`` raises this logger to WARNING.  A server started any other way
(tests, notebooks: ``refimpl/notebook.py``) has no handler at INFO, so
nothing is printed there, and the line is not even formatted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .patterns.errors import FAILURES

if TYPE_CHECKING:
    from .engine import Generation

log = logging.getLogger("refimpl.access")

#: Where each protocol's generations come from.
_ROUTE = {
    "sse": "POST /v1/chat/completions",
    "http": "POST /v1/chat/completions",
    "websocket": "WS /v1/ws/chat",
}


def _status(gen: Generation, name: str, detail: str | None) -> str:
    if gen.protocol == "websocket":
        return "-"
    if gen.protocol == "sse" or name == "done":
        return "200"
    if name == "error":  # a non-streamed failure: the status it was given
        return str(FAILURES.get(detail, (500, False))[0])
    return "499"  # nginx's "client closed request": nothing was sent


def generation_ended(gen: Generation, name: str, detail: str | None) -> None:
    """One line for a request (or WebSocket turn) that made a generation."""
    if not log.isEnabledFor(logging.INFO):
        return
    trace = gen.trace
    start, end = trace.events[0].at, trace.events[-1].at
    first = trace.first("first_token")
    ttft = f"ttft {(first.at - start) * 1000:.0f} ms" if first else "ttft -"
    log.info(
        "%s %s %s %s %d tokens %s %.2f s %s(%s)",
        gen.protocol,
        _ROUTE.get(gen.protocol, "-"),
        _status(gen, name, detail),
        gen.id,
        gen.completion_tokens,
        ttft,
        end - start,
        name,
        detail or "",
    )


def request_done(method: str, path: str, status: int, seconds: float) -> None:
    """One line for a request that made no generation."""
    if log.isEnabledFor(logging.INFO):
        log.info("http %s %s %d %.1f ms", method, path, status, seconds * 1000)
