"""``refimpl bench resume``: what a resumable stream costs, and what Redis adds to it (lesson 11).

Strategy
--------
A resumable stream (``patterns/resume.py``) is not written by the request
that asks for it: a producer task appends each event to a replay log and
every reader follows the log.  With ``--store redis://`` (``redis_store.py``)
each event also goes to a Redis Stream, and another process serves a resume
from a *mirror*, one ``XREAD BLOCK`` per generation.  Lesson 11 says what
that buys; this bench says what it costs, in one run, on loopback, against
real processes: a throwaway ``redis-server`` (``examples/redis_server.py``),
``refimpl serve`` with the memory store (*M*), and two ``refimpl serve
--store redis://`` (*A* produces, *B* mirrors).  Each is a subprocess, so
its CPU time and memory are its own (``benchload.cpu_seconds``,
``memory_kib``).  The phases, in this order:

1. **kept** (first, while the processes are young, so that memory freed by
   the later phases does not hide the growth): ``--kept`` finished
   generations of ``--kept-tokens`` tokens at itl 0 -- ordinary ones, then
   resumable ones, on *M*; resumable ones on *A*.  The producing process's
   RSS growth per generation (an ordinary one costs something too: the
   engine keeps the last 512 traces), Redis's ``used_memory`` growth per
   generation, and ``MEMORY USAGE`` of one ``refimpl:{id}:events`` per
   event, beside the event's size on the wire.
2. **load**: one paced load (``--streams`` x ``--tokens`` at ``--itl-ms``,
   each read to the end by its POST) three times: not resumable and
   resumable on *M*, resumable on *A*.  The producing process's CPU per
   token (and redis-server's), the first token's delay and the ITL.
3. **mirror**: the paced load on *A* again, each stream also read on *B*
   (``GET .../events``) from its second event on; by then its first is in
   Redis, since the producer writes an event only after the XADD of the one
   before.  Both readers live in this process and stamp each event on one
   clock (``perf_counter``), so an event's arrival on *B* minus its arrival
   on *A* is what the trip through Redis added: the XADD, the blocked XREAD
   waking, *B*'s writer.  Only events that reached *A* after *B*'s response
   head count; the earlier ones reach *B* as a replay.  And *B*'s CPU per
   token: the cost of a mirror.
4. **resume**: ``--resumes`` times each, ``GET .../events`` with
   ``Last-Event-ID`` half-way into a generation of phase 1, on a warm
   connection, until the first replayed event arrives: on the process that
   made it (*M*; *A*) and on another one (*B*: a new mirror each time, an
   ``EXISTS`` and an ``XREAD`` before the first byte).

The report (the table, ``--write-lesson``) is ``bench_resume_report.py``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import coredis
import httpx
import trio

from .bench_report import environment, ms, percentile, write_results
from .bench_resume_report import COLUMNS, markdown_table, write_lesson
from .benchload import HOST, cpu_seconds, memory_kib
from .config import DEFAULT_MODEL
from .examples.cluster import STOP_WAIT, Worker
from .examples.redis_server import RedisServer
from .sse import SSEParser

CHAT = "/v1/chat/completions"
AT_ONCE = 16  # kept generations in flight at a time


@dataclass(frozen=True, slots=True)
class Settings:
    streams: int = 16
    tokens: int = 200
    itl_ms: float = 20.0
    kept: int = 200
    kept_tokens: int = 200
    resumes: int = 50


HELP = {
    "streams": "concurrent paced streams (load and mirror)",
    "tokens": "tokens per paced stream",
    "itl_ms": "the model's delay between two tokens of a paced stream",
    "kept": "finished generations kept, for the memory per generation (at most 200)",
    "kept_tokens": "tokens per kept generation (at most 250: one XREAD replays it)",
    "resumes": "resumes of each kind (at most --kept)",
}
QUICK = Settings(streams=4, tokens=30, itl_ms=10.0, kept=20, kept_tokens=30, resumes=10)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="what resumable streams cost, in memory and through Redis (lesson 11)")
    for f in fields(Settings):
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), help=f"{HELP[f.name]} ({f.default:g})"
        )
    p.add_argument("--quick", action="store_true", help="a run of a few seconds: " + command_line(QUICK)[21:])
    p.add_argument("--out", type=Path, default=Path("bench-results/resume"), help="the results folder")
    p.add_argument(
        "--write-lesson",
        action="store_true",
        help="also commit the run to lessons/data/11-resume.json and lesson 11",
    )
    p.set_defaults(run=run)


def settings(args: argparse.Namespace) -> Settings:
    base = asdict(QUICK if args.quick else Settings())
    s = Settings(
        **{k: default if getattr(args, k) is None else getattr(args, k) for k, default in base.items()}
    )
    if min(s.streams, s.tokens, s.kept, s.kept_tokens, s.resumes) < 1 or s.itl_ms <= 0:
        raise SystemExit("need every count >= 1 and --itl-ms > 0")
    if s.kept > 200 or s.kept_tokens > 250 or s.resumes > s.kept or s.streams > 500:
        raise SystemExit("need --kept <= 200, --kept-tokens <= 250, --resumes <= --kept, --streams <= 500")
    return s


def command_line(s: Settings) -> str:
    knobs = (f"--{f.name.replace('_', '-')} {getattr(s, f.name):g}" for f in fields(Settings))
    return "refimpl bench resume " + " ".join(knobs)


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


# -- the phases (the module header) -------------------------------------------------------------
def per_token_us(seconds: float, tokens: int) -> float:
    return round(seconds / tokens * 1e6, 2)


async def written(redis: coredis.Redis) -> None:
    """Until every producer on the Redis store wrote its ending (its lease is deleted with it)."""
    with trio.fail_after(10):  # (no event crosses from another process: ask every 10 ms)
        while await redis.keys("refimpl:*:owner"):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def kept(client: httpx.AsyncClient, m: Worker, a: Worker, redis: coredis.Redis, s: Settings) -> dict:
    """Phase 1: memory per kept generation (RSS in KiB, Redis's in bytes)."""

    async def keep(worker: Worker, resumable: bool) -> tuple[list[Stream], float]:
        before = memory_kib(worker.pid)[0]
        streams = await posts(client, worker, s.kept, chat(s.kept_tokens, 0, resumable), AT_ONCE)
        return streams, round((memory_kib(worker.pid)[0] - before) / s.kept, 1)

    def wire(streams: list[Stream]) -> float:
        return round(sum(x.wire for x in streams) / sum(len(x.arrived) for x in streams), 1)

    plain, plain_kib = await keep(m, False)
    on_m, m_kib = await keep(m, True)
    used = int((await redis.info("memory"))["used_memory"])
    on_a, a_kib = await keep(a, True)
    await written(redis)
    used = int((await redis.info("memory"))["used_memory"]) - used
    one = f"refimpl:{on_a[0].gen_id}:events"
    one_bytes, one_events = await redis.memory_usage(one, samples=0), await redis.xlen(one)
    return {
        "not resumable": {"rss_kib_per_kept": plain_kib, "wire_bytes_per_event": wire(plain)},
        "resumable, memory store": {"rss_kib_per_kept": m_kib, "wire_bytes_per_event": wire(on_m)},
        "resumable, Redis store": {
            "rss_kib_per_kept": a_kib,
            "wire_bytes_per_event": wire(on_a),
            "redis_kib_per_kept": round(used / s.kept / 1024, 1),
            "redis_bytes_per_event": round(one_bytes / one_events, 1),
            "redis_bytes_one_log": one_bytes,
        },
        "ids": {"memory": [x.gen_id for x in on_m], "redis": [x.gen_id for x in on_a]},
    }


async def paced(
    client: httpx.AsyncClient, worker: Worker, s: Settings, resumable: bool, redis_pid: int
) -> dict:
    """Phase 2: the paced load on ``worker``; its CPU per token, the client's latencies."""
    cpu, redis_cpu = cpu_seconds(worker.pid), cpu_seconds(redis_pid)
    streams = await posts(client, worker, s.streams, chat(s.tokens, s.itl_ms, resumable))
    cpu, redis_cpu = cpu_seconds(worker.pid) - cpu, cpu_seconds(redis_pid) - redis_cpu
    tokens = sum(len(x.tokens) for x in streams)
    if tokens != s.streams * s.tokens:
        raise RuntimeError(f"the paced load got {tokens} tokens of {s.streams * s.tokens}")
    itl = [b - a for x in streams for a, b in itertools.pairwise(x.tokens)]
    return {
        "server_cpu_us_per_token": per_token_us(cpu, tokens),
        "redis_cpu_us_per_token": per_token_us(redis_cpu, tokens),
        "first_token_ms_p50": ms(percentile([x.tokens[0] - x.sent for x in streams], 50)),
        "itl_ms_p50": ms(percentile(itl, 50)),
        "itl_ms_p99": ms(percentile(itl, 99)),
        "tokens": tokens,
    }


async def mirrored(client: httpx.AsyncClient, a: Worker, b: Worker, s: Settings) -> dict:
    """Phase 3: each paced stream on ``a`` also read on ``b``: how much later each event came there."""
    pairs, body = [(Stream(), Stream()) for _ in range(s.streams)], chat(s.tokens, s.itl_ms, True)

    async def on_b_too(on_a: Stream, on_b: Stream) -> None:
        await on_a.second.wait()  # the first event is in Redis by now
        await read(client, on_b, "GET", f"{b.url}{CHAT}/{on_a.gen_id}/events")

    cpu = cpu_seconds(b.pid)
    async with trio.open_nursery() as nursery:
        for on_a, on_b in pairs:
            nursery.start_soon(functools.partial(read, client, on_a, "POST", a.url + CHAT, json=body))
            nursery.start_soon(on_b_too, on_a, on_b)
    cpu = cpu_seconds(b.pid) - cpu
    later = []
    for on_a, on_b in pairs:
        if on_a.arrived.keys() != on_b.arrived.keys():
            raise RuntimeError(f"{on_a.gen_id}: B got {len(on_b.arrived)} events, A {len(on_a.arrived)}")
        later += [on_b.arrived[seq] - at for seq, at in on_a.arrived.items() if at > on_b.head]
    return {
        "through_redis_ms_p50": ms(percentile(later, 50)),
        "through_redis_ms_p99": ms(percentile(later, 99)),
        "through_redis_ms_max": ms(max(later, default=None)),
        "through_redis_events": len(later),
        "mirror_cpu_us_per_token": per_token_us(cpu, s.streams * s.tokens),
    }


async def resumes(client: httpx.AsyncClient, m: Worker, a: Worker, b: Worker, ids: dict, s: Settings) -> dict:
    """Phase 4: resume latency, the three kinds taking turns (so that drift hits all alike)."""
    after, times = s.kept_tokens // 2, {"m": [], "a": [], "b": []}
    for i in range(s.resumes):
        times["m"].append(await resume(client, m, ids["memory"][i], after))
        times["a"].append(await resume(client, a, ids["redis"][i], after))
        times["b"].append(await resume(client, b, ids["redis"][i], after))  # a new mirror each time
    p = {k: (ms(percentile(v, 50)), ms(percentile(v, 99))) for k, v in times.items()}
    return {
        "resumable, memory store": {"resume_same_ms_p50": p["m"][0], "resume_same_ms_p99": p["m"][1]},
        "resumable, Redis store": {
            "resume_same_ms_p50": p["a"][0],
            "resume_same_ms_p99": p["a"][1],
            "resume_other_ms_p50": p["b"][0],
            "resume_other_ms_p99": p["b"][1],
        },
    }


async def warm_up(client: httpx.AsyncClient, m: Worker, a: Worker, b: Worker, s: Settings) -> None:
    """A warm connection per paced stream to each server; the resumable paths each taken once."""
    for worker in (m, a, b):
        await posts(client, worker, s.streams, chat(2, 0, False))
    await posts(client, m, 4, chat(2, 0, True))
    first = await posts(client, a, 4, chat(2, 0, True))
    await resume(client, b, first[0].gen_id, 1)


def note(what: str) -> None:
    print(f"resume: {what}", file=sys.stderr, flush=True)


async def measure(s: Settings) -> dict[str, Any]:
    load_before, columns = os.getloadavg()[0], {c: {} for c in COLUMNS}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        RedisServer() as redis_server,
        refimpl_servers(None, redis_server.url, redis_server.url) as (m, a, b),
        coredis.Redis.from_url(redis_server.url) as redis,
        httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(30, read=60)) as client,
    ):
        await warm_up(client, m, a, b, s)
        note(f"kept: {s.kept} generations × {s.kept_tokens} tokens, three times")
        found = await kept(client, m, a, redis, s)
        ids = found.pop("ids")
        note(f"load: {s.streams} streams × {s.tokens} tokens at itl {s.itl_ms:g} ms, three times")
        for column, worker, resumable in zip(COLUMNS, (m, m, a), (False, True, True), strict=True):
            columns[column] |= found[column] | await paced(client, worker, s, resumable, redis_server.pid)
        note("mirror: the load again, each stream also read on another worker")
        columns[COLUMNS[2]] |= await mirrored(client, a, b, s)
        note(f"resume: {s.resumes} resumes of each kind")
        for column, figures in (await resumes(client, m, a, b, ids, s)).items():
            columns[column] |= figures
        redis_version = (await redis.info("server"))["redis_version"]
    for column in COLUMNS[:2]:  # no Redis behind these: its CPU was another process's noise
        del columns[column]["redis_cpu_us_per_token"]
    machine = environment()
    machine["versions"] |= {"coredis": metadata.version("coredis"), "redis-server": redis_version}
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(s),
        "config": asdict(s),
        "machine": {**machine, "loadavg_1min": [load_before, os.getloadavg()[0]]},
        "columns": columns,
    }


async def run(args: argparse.Namespace) -> int:
    s = settings(args)
    if args.write_lesson and s != Settings():
        raise SystemExit("--write-lesson commits the lesson's run: leave every other option at its default")
    started, failures = time.perf_counter(), []
    try:
        result = await measure(s)
    except* RuntimeError as failed:  # a request that failed: what it said, no traceback
        failures = failed.exceptions
    for err in failures:
        print(f"error: {err}", file=sys.stderr)
    if failures:
        return 1
    table = markdown_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, result)
    (args.out / "results.md").write_text(table + "\n")
    print(f"{table}\n\nresults: {path} ({time.perf_counter() - started:.0f} s)")
    if args.write_lesson:
        print("".join(f"lesson: {p}\n" for p in write_lesson(result)), end="")
    return 0
