"""Exercise 00: time what the reader sees (lesson 00).

Complete two functions.

``time_to_first_text(client, url, body)``
    send ``body`` as a streamed chat request to the server at ``url`` and
    return the seconds (on ``trio.current_time()``) from sending it to the
    first chunk that carries *text*.  ``refimpl.client.stream_chat`` gives
    you the events, each stamped with ``event.at``.

``tpot(trace)``
    the time per output token, in seconds, from a generation's trace (the
    JSON of ``GET /v1/debug/generations/{id}``: ``trace["events"]`` is a
    list of ``{"name", "at", "tokens", "detail"}``).  Lesson 00's "Push on
    it" 4 has the formula.

What is here now is the measurement people write first, and both are
wrong: one times the first *byte*, the other spreads the wait for the first
token over every token.  Run ``make exercise N=00`` to see by how much.
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
        if first is None:
            first = event.at - start
    return first


def tpot(trace: dict[str, Any]) -> float:
    at = {event["name"]: event["at"] for event in trace["events"]}
    return (at["done"] - at["accepted"]) / trace["completion_tokens"]
