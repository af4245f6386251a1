"""Measure what a reader feels: a full response versus a streamed one.

Lesson 00 and its notebook use these two functions side by side; the test of
lesson 00 runs them under trio's ``MockClock`` to check the formulas the
lesson states.  Both return a :class:`Timing` whose times are seconds on
``trio.current_time()`` relative to the moment the request was sent, so they
can be laid next to the server's trace (``GET /v1/debug/generations/{id}``),
which uses the same clock when client and server share a trio loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from ..client import stream_chat


@dataclass
class Timing:
    id: str = ""
    ttft: float | None = None  # request sent -> first content visible to the reader
    e2e: float | None = None  # request sent -> the answer is complete
    text: str = ""
    # (seconds since the request, content) for every content chunk, in order
    arrivals: list[tuple[float, str]] = field(default_factory=list)


# region: time-full
async def time_full(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timing:
    """``stream: false``: nothing is visible until the whole answer is."""
    start = trio.current_time()
    resp = await client.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
    resp.raise_for_status()
    now = trio.current_time() - start
    answer = resp.json()
    text = answer["choices"][0]["message"]["content"]
    return Timing(answer["id"], ttft=now, e2e=now, text=text, arrivals=[(now, text)])


# endregion: time-full


# region: time-streamed
async def time_streamed(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timing:
    """``stream: true``: each token is visible the moment its chunk is parsed."""
    timing = Timing()
    start = trio.current_time()
    async for event in stream_chat(client, url, body):
        timing.id = event.id
        if event.content:  # the role chunk and the final chunk carry no text
            timing.arrivals.append((event.at - start, event.content))
    timing.e2e = trio.current_time() - start  # stream_chat returned at [DONE]
    timing.ttft = timing.arrivals[0][0] if timing.arrivals else None
    timing.text = "".join(content for _, content in timing.arrivals)
    return timing


# endregion: time-streamed
