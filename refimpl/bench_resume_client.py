"""The instruments of ``refimpl bench resume``: its servers, and a client that stamps every event.

Strategy
--------
``bench_resume.py`` decides what to measure; this module holds what it
measures with.  The servers are real ``refimpl serve`` processes, each on a
free loopback port (``--port 0``), started with ``examples/cluster.py``'s
:class:`~refimpl.examples.cluster.Worker` (the same readiness check as the
cluster: the welcome line, then ``GET /v1/models``), all at once, and always
stopped (SIGTERM, then SIGKILL).  The client reads a whole event stream and
notes, per event id, when the network read that carried it returned
(``perf_counter``, one clock for every reader in the bench's process): the
same event's two stamps, one per process that served it, are what the
mirror phase compares.  An error event, a status other than 200 or a stream
without ``[DONE]`` raises: a cost bench whose requests fail measures nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from .benchload import HOST
from .config import DEFAULT_MODEL
from .examples.cluster import STOP_WAIT, Worker
from .sse import SSEParser

CHAT = "/v1/chat/completions"


# -- the processes --------------------------------------------------------------------------------
@asynccontextmanager
async def refimpl_servers(*stores: str | None) -> AsyncIterator[list[Worker]]:
    """A ``refimpl serve`` per store (None: the memory store), started at once, always stopped."""
    started: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="refimpl-bench-resume-") as logs:
        try:
            for i, store in enumerate(stores):
                serve = [sys.executable, "-m", "refimpl", "serve", "--quiet", "--host", HOST, "--port", "0"]
                started.append(Worker(serve + (["--store", store] if store else []), Path(logs) / f"{i}.log"))
            for worker in started:
                await trio.to_thread.run_sync(worker.wait_ready)
            yield started
        finally:
            with trio.CancelScope(shield=True):
                for worker in started:
                    worker.proc.terminate()
                for worker in started:
                    with trio.move_on_after(STOP_WAIT):
                        await trio.to_thread.run_sync(worker.proc.wait)
                    await trio.to_thread.run_sync(worker.kill)


# -- the client -----------------------------------------------------------------------------------
@dataclass
class Stream:
    """One response as this process saw it; times are ``perf_counter()``."""

    sent: float = 0.0  # just before the request
    head: float = 0.0  # when its response head arrived
    gen_id: str = ""
    arrived: dict[int, float] = field(default_factory=dict)  # event id (or number) -> when
    tokens: list[float] = field(default_factory=list)  # each content token's arrival
    wire: int = 0  # body bytes
    done: bool = False  # [DONE] came
    second: trio.Event = field(default_factory=trio.Event)  # set at its second event


async def read(client: httpx.AsyncClient, stream: Stream, method: str, url: str, **request: Any) -> Stream:
    """Send the request, read the whole event stream, stamp each event when its read returned."""
    parser = SSEParser()
    stream.sent = time.perf_counter()
    async with client.stream(method, url, **request) as resp:
        stream.head = time.perf_counter()
        if resp.status_code != 200:
            raise RuntimeError(f"{method} {url}: HTTP {resp.status_code} {(await resp.aread())[:300]!r}")
        stream.gen_id = resp.headers["X-Request-Id"]
        async for raw in resp.aiter_raw():
            now = time.perf_counter()
            stream.wire += len(raw)
            for event in parser.feed(raw):
                if event.type == "error":
                    raise RuntimeError(f"{method} {url}: {event.data}")
                seq = int(event.last_event_id or len(stream.arrived) + 1)  # no id: not resumable
                stream.arrived[seq] = now
                if len(stream.arrived) == 2:
                    stream.second.set()
                if event.data == "[DONE]":
                    stream.done = True
                elif (choices := json.loads(event.data)["choices"]) and choices[0]["delta"].get("content"):
                    stream.tokens.append(now)
    if not stream.done:
        raise RuntimeError(f"{method} {url}: the stream ended without [DONE]")
    return stream


def chat(tokens: int, itl_ms: float, resumable: bool) -> dict[str, Any]:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "bench resume"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "simulate": {"tokens": tokens, "ttft_ms": 0, "itl_ms": itl_ms},
    }
    return body | ({"resumable": True} if resumable else {})


async def posts(
    client: httpx.AsyncClient, worker: Worker, n: int, body: dict[str, Any], at_once: int | None = None
) -> list[Stream]:
    """``n`` POSTs of ``body``, ``at_once`` at a time (None: all at once), each read to the end."""
    streams, limit = [Stream() for _ in range(n)], trio.CapacityLimiter(at_once or n)

    async def one(stream: Stream) -> None:
        async with limit:
            await read(client, stream, "POST", worker.url + CHAT, json=body)

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(one, stream)
    return streams


async def resume(client: httpx.AsyncClient, worker: Worker, gen_id: str, after: int) -> float:
    """Seconds from a resume's request to its first replayed event."""
    url, headers = f"{worker.url}{CHAT}/{gen_id}/events", {"Last-Event-ID": str(after)}
    stream = await read(client, Stream(), "GET", url, headers=headers)
    if min(stream.arrived) != after + 1:
        raise RuntimeError(f"GET {url} after {after} began at event {min(stream.arrived)}")
    return min(stream.arrived.values()) - stream.sent
