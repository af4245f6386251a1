"""Exercise 07, a solution: never show a failed stream as a whole answer.

The task is in ``../exercise.py``.  Three checks, each a few words: the
status before the stream, the event type inside it, and ``[DONE]`` at its
end -- the only sign that separates "finished" from "cut off" (lesson 07,
"The error event, and the missing [DONE]"; ``refimpl/client.py`` is the
same reader, with timestamps).
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
        if resp.status_code != 200:  # refused before the stream began
            raise StreamFailed(json.loads(await resp.aread())["error"])
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    return text
                chunk = json.loads(event.data)
                if event.type == "error":  # failed after the 200 OK
                    raise StreamFailed(chunk["error"])
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
    raise StreamFailed({"code": "incomplete", "message": f"the stream ended without [DONE] after {text!r}"})
