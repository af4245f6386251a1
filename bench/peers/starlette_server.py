"""A peer server for ``refimpl bench``: plain Starlette on uvicorn, SSE framed by hand.

Strategy
--------
The same server and framework as ``sse_starlette_server.py`` with the SSE
library taken out.  There, FastAPI validates the body and sse-starlette's
``EventSourceResponse`` frames each event (CRLF), starts a ping task and
listens for a disconnect beside the stream.  Here a Starlette route reads
the JSON as it came and returns Starlette's own ``StreamingResponse`` over
an async generator that yields each event's bytes, ``data: {json}\\n\\n``,
the way the Starlette docs stream any body.  FastAPI's work is once per
request, so per token the difference between the two peers is what
sse-starlette costs.

Next to ``quart_asyncio_server.py`` it changes the framework and the server
together (Starlette on uvicorn, Quart on hypercorn), on the same asyncio
loop, with the same events and the same bytes on the wire.

The request, the chunks and the pacing are ``common.py``'s, shared with the
other peers so that only those layers differ; nothing here is tuned, and
nothing is made slow.  Run it the way the bench does::

    python bench/peers/starlette_server.py --port 8001 --itl-ms 0 --ttft-ms 0 --tokens 2000
"""

from __future__ import annotations

from common import MODELS, SSE_HEADERS, Answer, Knobs, events, parse_args, sse_event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


async def models(request: Request) -> JSONResponse:
    return JSONResponse(MODELS)


def create_app(knobs: Knobs) -> Starlette:
    async def chat(request: Request) -> StreamingResponse:
        answer = Answer.for_request(await request.json(), knobs)
        return StreamingResponse(
            events(answer, sse_event), media_type="text/event-stream", headers=SSE_HEADERS
        )

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def main() -> None:
    import uvicorn

    host, port, knobs = parse_args(__doc__)
    uvicorn.run(create_app(knobs), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
