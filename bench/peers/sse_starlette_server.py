"""The peer server for ``refimpl bench``: FastAPI + sse-starlette on uvicorn.

Strategy
--------
A cost-per-token number means little alone; it means something next to an
ordinary server doing the same job.  This is that server, written the way
the sse-starlette README teaches: a FastAPI route returns an
``EventSourceResponse`` around an async generator that yields one dict per
event, and each chunk is a plain ``json.dumps`` of the chunk object.  No
tricks in either direction: it is not tuned, and it is not made slow.

It streams the same thing as ``refimpl serve`` for the bench's request: the
same token text (``refimpl.model.simulated_text``; ``common.events`` notes
where the cycling differs), the same OpenAI ``chat.completion.chunk`` objects
(role chunk, one chunk per token, a final chunk, a usage chunk when asked,
``[DONE]``), and the same timing knobs (``simulate.ttft_ms``/``itl_ms``/
``tokens``, server defaults from the command line).  The difference a reader
sees in every event is the line separator: sse-starlette writes CRLF,
refimpl LF; both are valid SSE.

All of that is ``common.py``, shared with the other two peers; what is left
here is FastAPI's part (a pydantic model validates the body, once per
request) and sse-starlette's (``EventSourceResponse`` frames every event and
runs a ping task and a disconnect listener beside the stream).  Next to
``starlette_server.py``, which frames the same events by hand on the same
Starlette and uvicorn, this peer shows what the SSE library costs per token.

Run it the way the bench does::

    python bench/peers/sse_starlette_server.py --port 8001 --itl-ms 0 --ttft-ms 0 --tokens 2000

It answers only what the bench sends (no stop sequences, no simulated
failures, no auth); lesson 13 explains the comparison.
"""

from __future__ import annotations

from typing import Any

from common import MODELS, Answer, Knobs, events, parse_args
from fastapi import FastAPI
from pydantic import BaseModel
from sse_starlette import EventSourceResponse


class Message(BaseModel):
    role: str
    content: str = ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Simulate(BaseModel):
    ttft_ms: float | None = None
    itl_ms: float | None = None
    tokens: int | None = None
    seed: int | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    seed: int | None = None
    simulate: Simulate | None = None


def sse_starlette_event(data: str) -> dict[str, str]:
    """One event the way the sse-starlette README yields it: a dict."""
    return {"data": data}


def create_app(knobs: Knobs) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return MODELS

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> EventSourceResponse:
        answer = Answer.for_request(req.model_dump(), knobs)
        return EventSourceResponse(events(answer, sse_starlette_event))

    return app


def main() -> None:
    import uvicorn

    host, port, knobs = parse_args(__doc__)
    uvicorn.run(create_app(knobs), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
