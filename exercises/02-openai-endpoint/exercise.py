"""Exercise 02: a client that collects a whole streamed answer (lesson 02).

Complete ``collect(client, url, body)``: send ``body`` to
``{url}/v1/chat/completions`` as a *streamed* request that asks for usage
(``"stream_options": {"include_usage": true}``), read the events with
``SSEParser``, and return an :class:`Answer`:

* ``text``: the content of every chunk, joined;
* ``finish_reason``: from the final chunk ("stop", or "length" when
  ``max_tokens`` cut the answer);
* ``usage``: the usage chunk's ``usage`` (``prompt_tokens``,
  ``completion_tokens``, ``total_tokens``);
* ``chunks``: how many JSON chunks came before ``data: [DONE]``.

Return as soon as ``[DONE]`` arrives: it is the end of the answer, whether or
not the server (or a proxy) closes the body at once.  Lesson 02, "The answer,
chunk by chunk", lists every chunk in order.

What is here now reads the content chunks fine, and is wrong twice; run
``make exercise N=02`` to see where.
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
                    continue
                chunk = json.loads(event.data)
                answer.chunks += 1
                choice = chunk["choices"][0]
                answer.text += choice["delta"].get("content") or ""
                answer.finish_reason = choice["finish_reason"] or answer.finish_reason
                answer.usage = chunk.get("usage") or answer.usage
    return answer
