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
same token text (``refimpl.model.simulated_text``, cycled the same way), the
same OpenAI ``chat.completion.chunk`` objects (role chunk, one chunk per
token, a final chunk, a usage chunk when asked, ``[DONE]``), and the same
timing knobs (``simulate.ttft_ms``/``itl_ms``/``tokens``, server defaults from
the command line).  The one difference a reader can see on the wire is the
line separator: sse-starlette writes CRLF, refimpl LF; both are valid SSE.

Run it the way the bench does::

    python bench/peers/sse_starlette_server.py --port 8001 --itl-ms 0 --ttft-ms 0 --tokens 2000

It answers only what the bench sends (no stop sequences, no simulated
failures, no auth); lesson 13 explains the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from refimpl.model import count_tokens, simulated_text

MODEL = "refimpl-sim"


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


def create_app(ttft_ms: float, itl_ms: float, tokens: int) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "peer"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> EventSourceResponse:
        sim = req.simulate or Simulate()
        ttft = (ttft_ms if sim.ttft_ms is None else sim.ttft_ms) / 1000
        itl = (itl_ms if sim.itl_ms is None else sim.itl_ms) / 1000
        want = tokens if sim.tokens is None else sim.tokens
        if req.max_tokens is not None:
            want = min(want, req.max_tokens)
        prompt = "\n".join(m.content for m in req.messages)
        seed = sim.seed if sim.seed is not None else (req.seed or 0)
        text = simulated_text(prompt, seed)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": "fp_peer",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**base, "choices": [choice]}
            if include_usage:
                out["usage"] = None  # OpenAI sends it on every chunk when asked
            return out

        async def events():
            yield {"data": json.dumps(chunk({"role": "assistant", "content": ""}, None))}
            await asyncio.sleep(ttft)
            for n in range(want):
                if n and itl:
                    await asyncio.sleep(itl)  # one decode step
                yield {"data": json.dumps(chunk({"content": text[n % len(text)]}, None))}
            finish = "length" if req.max_tokens is not None and want == req.max_tokens else "stop"
            yield {"data": json.dumps(chunk({}, finish))}
            if include_usage:
                p = count_tokens(prompt)
                usage = {"prompt_tokens": p, "completion_tokens": want, "total_tokens": p + want}
                yield {"data": json.dumps({**base, "choices": [], "usage": usage})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    app = create_app(args.ttft_ms, args.itl_ms, args.tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
