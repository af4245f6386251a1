"""Exercise 08, a solution: a client that hears the heartbeat.

The task is in ``../exercise.py``.  Pings are counted from the lines, before
the parser drops them (``refimpl/figures.py``'s ``record`` does the same for
lesson 08's plots).  The idle timeout is httpx's own *read* timeout: it
limits the wait for each network read, not the whole answer, so every read
-- a ping's too -- starts it again (lesson 08, "Push on it" 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from refimpl.sse import SSEParser


@dataclass
class Heard:
    text: str = ""
    pings: int = 0


async def listen(client: httpx.AsyncClient, url: str, body: dict[str, Any], idle_timeout: float) -> Heard:
    heard = Heard()
    endpoint, body = f"{url}/v1/chat/completions", {**body, "stream": True}
    async with client.stream("POST", endpoint, json=body, timeout=httpx.Timeout(idle_timeout)) as resp:
        parser, carry = SSEParser(), b""
        async for raw in resp.aiter_raw():
            *lines, carry = (carry + raw).split(b"\n")
            heard.pings += sum(line.startswith(b":") for line in lines)
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    return heard
                for choice in json.loads(event.data)["choices"]:
                    heard.text += choice["delta"].get("content") or ""
    return heard
