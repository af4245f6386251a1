"""A peer server for ``refimpl bench``: Quart on hypercorn's asyncio worker.

Strategy
--------
refimpl's closest twin.  ``refimpl serve`` is Quart-Trio on hypercorn's trio
worker; this is Quart on hypercorn's asyncio worker: the same server, the
same framework, another event loop.  The route is Quart's ordinary
streaming response, as the Quart docs write server-sent events: a
``Response`` over an async generator that yields each event's bytes
(``data: {json}\\n\\n``), with ``response.timeout = None`` because Quart
cuts a response off after ``RESPONSE_TIMEOUT`` (60 s) otherwise.  It is
served the programmatic way, ``hypercorn.asyncio.serve``, which on SIGTERM
shuts down gracefully as the bench expects.

What it isolates:

- next to ``starlette_server.py`` (the same events, framed the same way, on
  the same asyncio loop): what Quart and hypercorn cost against Starlette
  and uvicorn;
- next to refimpl: trio against asyncio, but not only that.  refimpl also
  writes up to ``--batch-tokens`` tokens per write with pre-encoded chunks,
  and patches hypercorn's write path (lesson 13), so the loop's share shows
  best against ``refimpl bench --batch-tokens 1 --no-fastwrite``, and even
  then refimpl's own framing and engine are in the difference.

The request, the chunks and the pacing are ``common.py``'s, shared with the
other peers so that only those layers differ; nothing here is tuned, and
nothing is made slow.  Run it the way the bench does::

    python bench/peers/quart_asyncio_server.py --port 8001 --itl-ms 0 --ttft-ms 0 --tokens 2000
"""

from __future__ import annotations

import asyncio
from typing import Any

from common import MODELS, SSE_HEADERS, Answer, Knobs, events, parse_args, sse_event
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, Response, request


def create_app(knobs: Knobs) -> Quart:
    app = Quart(__name__)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return MODELS

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        answer = Answer.for_request(await request.get_json(), knobs)
        response = Response(events(answer, sse_event), mimetype="text/event-stream", headers=SSE_HEADERS)
        response.timeout = None  # a stream may outlast RESPONSE_TIMEOUT
        return response

    return app


def main() -> None:
    host, port, knobs = parse_args(__doc__)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.loglevel = "WARNING"  # like the uvicorn peers: errors only, no access log
    asyncio.run(serve(create_app(knobs), config))


if __name__ == "__main__":
    main()
