"""Exercise 07: never show a failed stream as a whole answer (lesson 07).

``read_answer(client, url, body)`` streams ``body`` from
``{url}/v1/chat/completions`` and returns the answer's text -- but only for
an answer that is complete.  Make it raise :class:`StreamFailed` instead
when

* the server refuses the request (a status other than 200: its body is the
  OpenAI error object, ``{"error": {...}}``);
* the stream carries an ``event: error`` (its data is ``{"error": {...}}``);
* the body ends without ``data: [DONE]``.

Give :class:`StreamFailed` the server's error object where there is one, so
the caller can read its ``code`` ("overloaded", "model_not_found", ...), and
one of your own (say ``{"code": "incomplete"}``) for a stream cut short.

What is here now is a reader that works on every stream that succeeds, and
returns a partial answer as if it were whole on every stream that does not
(lesson 07, "The broken version").  Run ``make exercise N=07``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from refimpl.sse import SSEParser


class StreamFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message") or error.get("code") or "the stream failed")
        self.error = error


async def read_answer(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
    text = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    return text
                chunk = json.loads(event.data)
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
    return text
