"""Exercise 13, a solution: TTFT and ITL from what arrived, and when.

The task is in ``../exercise.py``.  A read carries as many tokens as the
server had ready when it wrote (up to ``--batch-tokens``, 64) and as the
socket had gathered since the last read, so a client counts the tokens in
each read and gives each the read's time.  A model that is ahead of the
socket then shows what it is: an ITL median of 0 and far fewer reads than
tokens (``client_reads`` in ``refimpl bench``'s table).
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
            now = trio.current_time()  # every event in this read arrived now
            if tokens := sum(content_tokens(event) for event in parser.feed(raw)):
                reads.append((now, tokens))
    return summarize(sent, reads)


def summarize(sent: float, reads: list[tuple[float, int]]) -> Summary:
    stamps = [at for at, tokens in reads for _ in range(tokens)]  # one stamp per token
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Summary(
        ttft=stamps[0] - sent,
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
        e2e=stamps[-1] - sent,
        tokens=len(stamps),
        reads=len(reads),
    )
