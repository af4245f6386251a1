"""Exercise 13: TTFT and ITL from what arrived, and when (lesson 13).

``measure(client, url, body)`` streams one answer and stamps every network
read (``aiter_raw``) with ``trio.current_time()``; ``summarize(sent,
reads)`` turns ``reads`` -- one ``(when, content tokens in that read)`` per
read that carried any -- into a :class:`Summary`, the way ``refimpl bench``
does (lesson 13, "What is measured, and where"): every token is stamped
with the time of the read that carried it, so

* ``ttft``: from ``sent`` to the first token; ``e2e``: to the last one;
* ``itl_p50``, ``itl_p99``: percentiles (``refimpl.bench.percentile``) of
  the gaps between consecutive *tokens* -- tokens that came in one read are
  0 s apart;
* ``tokens``: content tokens received; ``reads``: reads that carried them.

What is here now counts what a paced model sends correctly, and assumes one
token per read, which a model that is ahead of the socket breaks (lesson 02,
"Push on it" 4: bursts).  Fix ``measure`` and ``summarize``; run
``make exercise N=13``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from refimpl.bench import percentile
from refimpl.sse import Event, SSEParser


@dataclass
class Summary:
    ttft: float
    itl_p50: float | None
    itl_p99: float | None
    e2e: float
    tokens: int
    reads: int


def content_tokens(event: Event) -> int:
    """1 for a chunk that carries text, else 0 (role, final, usage, [DONE])."""
    if event.data == "[DONE]":
        return 0
    choices = json.loads(event.data).get("choices") or [{}]
    return 1 if choices[0].get("delta", {}).get("content") else 0


async def measure(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Summary:
    reads: list[tuple[float, int]] = []
    sent = trio.current_time()
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            now = trio.current_time()
            if any(content_tokens(event) for event in parser.feed(raw)):
                reads.append((now, 1))
    return summarize(sent, reads)


def summarize(sent: float, reads: list[tuple[float, int]]) -> Summary:
    stamps = [at for at, _ in reads]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Summary(
        ttft=stamps[0] - sent,
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
        e2e=stamps[-1] - sent,
        tokens=len(stamps),
        reads=len(reads),
    )
