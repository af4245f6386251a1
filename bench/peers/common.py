"""What the bench's peer servers share: the command line, the answer, the pacing.

Strategy
--------
``refimpl bench`` measures refimpl's CPU per token next to ordinary Python
servers doing the same job (lesson 13).  One peer alone gives one ratio and
no explanation; a row of peers, each changing as little as it can from the
one above, shows what each layer costs:

=============================  ==================  ==========  ================
peer                           server, loop        framework   SSE framing
=============================  ==================  ==========  ================
``sse_starlette_server.py``    uvicorn, asyncio    FastAPI     sse-starlette
``starlette_server.py``        uvicorn, asyncio    Starlette   by hand
``quart_asyncio_server.py``    hypercorn, asyncio  Quart       by hand
refimpl (``refimpl serve``)    hypercorn, trio     Quart-Trio  refimpl's framer
=============================  ==================  ==========  ================

The first step takes the SSE library away (FastAPI's own work is once per
request), the second changes framework and server together, the third the
event loop (and more: the Quart peer's header says what).

For that subtraction to mean anything, a difference between two peers must
come from the layer that changed, not from how the peer was written.  So all
of it lives here, once:

- the command line (``--host --port --ttft-ms --itl-ms --tokens``, the same
  for every peer, the one ``refimpl.benchload.server_command`` passes);
- the answer to a request (:class:`Answer`): the same token text as
  ``refimpl serve`` (``refimpl.model.simulated_text``), the same OpenAI
  ``chat.completion.chunk`` objects (role chunk, one chunk per token, a final
  chunk, a usage chunk when ``stream_options.include_usage`` asks, ``[DONE]``),
  each a plain ``json.dumps``, the ordinary way;
- the pacing (:func:`events`): ``asyncio.sleep`` for the first token's delay
  and between tokens, which is how an asyncio server waits.

What is left in each peer is only what differs: the routes, how the body is
read, which response class streams the events, and which server runs it.

Every peer answers only what the bench sends (no stop sequences, no simulated
failures, no auth), and streams whether or not the request says
``"stream": true``.  A body the bench would not send is FastAPI's 422 in the
first peer and an unhandled error, a 500, in the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from refimpl.model import count_tokens, simulated_text, simulated_token

MODEL = "refimpl-sim"
# GET /v1/models: the bench counts a server as up once this answers 200.
MODELS = {
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "peer"}],
}


@dataclass(frozen=True)
class Knobs:
    """The simulated model's timing from the command line; a request's
    ``simulate`` object overrides each of them (as it does for ``refimpl serve``)."""

    ttft_ms: float
    itl_ms: float
    tokens: int


def parse_args(doc: str) -> tuple[str, int, Knobs]:
    """The peers' one command line: ``(host, port, knobs)``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    return args.host, args.port, Knobs(args.ttft_ms, args.itl_ms, args.tokens)


@dataclass(frozen=True)
class Answer:
    """One request's stream: what it says, and how fast."""

    text: list[str]  # the tokens the model cycles through
    tokens: int  # how many it sends
    ttft_s: float
    itl_s: float
    finish_reason: str
    include_usage: bool
    prompt_tokens: int
    base: dict[str, Any]  # the fields every chunk of this stream carries

    @classmethod
    def for_request(cls, body: Mapping[str, Any], knobs: Knobs) -> Answer:
        """Read the bench's request: a JSON object, as sent or as validated."""
        sim = body.get("simulate") or {}

        def knob(name: str, default: float) -> Any:
            return default if sim.get(name) is None else sim[name]

        tokens = knob("tokens", knobs.tokens)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            tokens = min(tokens, max_tokens)
        prompt = "\n".join(m.get("content", "") for m in body["messages"])
        seed = sim["seed"] if sim.get("seed") is not None else (body.get("seed") or 0)
        return cls(
            text=simulated_text(prompt, seed),
            tokens=tokens,
            ttft_s=knob("ttft_ms", knobs.ttft_ms) / 1000,
            itl_s=knob("itl_ms", knobs.itl_ms) / 1000,
            finish_reason="length" if max_tokens is not None and tokens == max_tokens else "stop",
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            prompt_tokens=count_tokens(prompt),
            base={
                "id": "chatcmpl-" + secrets.token_hex(12),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "system_fingerprint": "fp_peer",
            },
        )

    def chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        out = {**self.base, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # OpenAI sends it on every chunk when asked
        return out

    def usage_chunk(self) -> dict[str, Any]:
        p, c = self.prompt_tokens, self.tokens
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return {**self.base, "choices": [], "usage": usage}


Event = TypeVar("Event")


async def events(answer: Answer, frame: Callable[[str], Event]) -> AsyncIterator[Event]:
    """The stream, one ``frame(data)`` per SSE event, paced like the model.

    ``data`` is the event's data: a chunk's JSON, or ``[DONE]``.  ``frame``
    turns it into what the peer's response class wants (a dict for
    sse-starlette, the event's bytes for the others).  The first token waits
    ``ttft`` after the role chunk, each later one ``itl`` after the one
    before (``ttft`` 0 still yields to the loop once; ``itl`` 0 never does).

    The text cycles with ``refimpl.model.simulated_token``, as in ``refimpl
    serve``: a space before the first word each time the text starts over,
    so a peer sends the same bytes of content at any length.
    """
    text, itl = answer.text, answer.itl_s
    yield frame(json.dumps(answer.chunk({"role": "assistant", "content": ""}, None)))
    await asyncio.sleep(answer.ttft_s)
    for n in range(answer.tokens):
        if n and itl:
            await asyncio.sleep(itl)  # one decode step
        yield frame(json.dumps(answer.chunk({"content": simulated_token(text, n)}, None)))
    yield frame(json.dumps(answer.chunk({}, answer.finish_reason)))
    if answer.include_usage:
        yield frame(json.dumps(answer.usage_chunk()))
    yield frame("[DONE]")


# What a peer that frames SSE by hand sends: the content type, and no caching.
SSE_HEADERS = {"Cache-Control": "no-cache"}


def sse_event(data: str) -> bytes:
    """One event with a single ``data`` field, for a peer that frames SSE itself.

    WHATWG HTML §9.2.5: a line ends with CRLF, LF or CR, and an empty line
    dispatches the event; we use LF, as refimpl does.  ``data`` never holds a
    line break (``json.dumps`` escapes them), so one ``data:`` line suffices.
    """
    return f"data: {data}\n\n".encode()
