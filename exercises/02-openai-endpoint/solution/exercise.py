"""Exercise 02, a solution: a client that collects a whole streamed answer.

The task is in ``../exercise.py``.  Two things the first version missed:
the usage chunk has ``"choices": []``, so there is no ``choices[0]`` to read
(lesson 02, "The answer, chunk by chunk", item 4), and ``[DONE]`` *is* the
end: waiting for the body to close as well trusts every server and proxy
on the way to close it promptly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from refimpl.sse import SSEParser


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    chunks: int = 0


async def collect(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Answer:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer = Answer()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    return answer
                chunk = json.loads(event.data)
                answer.chunks += 1
                for choice in chunk["choices"]:  # none in the usage chunk
                    answer.text += choice["delta"].get("content") or ""
                    answer.finish_reason = choice["finish_reason"] or answer.finish_reason
                answer.usage = chunk.get("usage") or answer.usage
    return answer
