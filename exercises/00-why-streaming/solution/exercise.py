"""Exercise 00, a solution: time what the reader sees.

The task is in ``../exercise.py``.  The role chunk arrives at once, before
the model has made anything, so the first *text* is what the reader waits
for (lesson 00, "First byte is not first token").  TPOT leaves the first
token out: from ``first_token`` to ``done`` there are ``completion_tokens
- 1`` gaps, each one ITL.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from refimpl.client import stream_chat


async def time_to_first_text(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    start = trio.current_time()
    first = None
    async for event in stream_chat(client, url, body):
        if first is None and event.content:  # the role chunk carries no text
            first = event.at - start
    return first


def tpot(trace: dict[str, Any]) -> float:
    at = {event["name"]: event["at"] for event in trace["events"]}
    return (at["done"] - at["first_token"]) / (trace["completion_tokens"] - 1)
