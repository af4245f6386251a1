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
   Redis, since the producer writes the first event at once (the others go
   in the writer's batches).  Both readers live in this process and stamp
   each event on one clock (``perf_counter``), so an event's arrival on *B*
   minus its arrival on *A* is what the trip through Redis added: the
   writer's wait and pipeline, the mirror's XREAD and its wait, *B*'s writer.  Only events that reached *A* after *B*'s response
   head count; the earlier ones reach *B* as a replay.  And *B*'s CPU per
   token: the cost of a mirror.
4. **resume**: ``--resumes`` times each, ``GET .../events`` with
   ``Last-Event-ID`` half-way into a generation of phase 1, on a warm
   connection, until the first replayed event arrives: on the process that
   made it (*M*; *A*) and on another one (*B*: a new mirror each time, an
   ``EXISTS`` and an ``XREAD`` before the first byte); for scale, a ``GET
   /v1/models`` before each round, the simplest request there is.

The servers and the client are ``bench_resume_client.py``; the report (the
table, ``--write-lesson``), ``bench_resume_report.py``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import coredis
import httpx
import trio

from .bench_knobs import add_knobs, knobs_from
from .bench_knobs import command_line as knob_line
from .bench_report import environment, ms, percentile, write_results
from .bench_resume_client import CHAT, Stream, chat, posts, read, refimpl_servers, resume
from .bench_resume_report import COLUMNS, markdown_table, write_lesson
from .benchload import cpu_seconds, memory_kib
from .examples.cluster import Worker
from .examples.redis_server import RedisServer

AT_ONCE = 16  # kept generations in flight at a time


@dataclass(frozen=True, slots=True)
class Settings:
    streams: int = 8
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
    add_knobs(p, Settings, HELP)
    p.add_argument("--quick", action="store_true", help="a run of a few seconds: " + command_line(QUICK)[21:])
    p.add_argument("--out", type=Path, default=Path("bench-results/resume"), help="the results folder")
    p.add_argument(
        "--write-lesson",
        action="store_true",
        help="also commit the run to lessons/data/11-resume.json and lesson 11",
    )
    p.set_defaults(run=run)


def settings(args: argparse.Namespace) -> Settings:
    s = knobs_from(args, QUICK)
    if min(s.streams, s.tokens, s.kept, s.kept_tokens, s.resumes) < 1 or s.itl_ms <= 0:
        raise SystemExit("need every count >= 1 and --itl-ms > 0")
    if s.kept > 200 or s.kept_tokens > 250 or s.resumes > s.kept or s.streams > 500:
        raise SystemExit("need --kept <= 200, --kept-tokens <= 250, --resumes <= --kept, --streams <= 500")
    return s


def command_line(s: Settings) -> str:
    return knob_line("resume", s)


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

    cpu, mine, wall = cpu_seconds(b.pid), time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for on_a, on_b in pairs:
            nursery.start_soon(functools.partial(read, client, on_a, "POST", a.url + CHAT, json=body))
            nursery.start_soon(on_b_too, on_a, on_b)
    cpu, mine = cpu_seconds(b.pid) - cpu, (time.process_time() - mine) / (time.perf_counter() - wall)
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
        "bench_cpu_share": round(mine, 2),  # of a core: the two readers of every stream, here
    }


async def resumes(client: httpx.AsyncClient, m: Worker, a: Worker, b: Worker, ids: dict, s: Settings) -> dict:
    """Phase 4: resume latency, the three kinds taking turns (so that drift hits all alike)."""
    after, times = s.kept_tokens // 2, {"m": [], "a": [], "b": [], "models": []}
    for i in range(s.resumes):
        sent = time.perf_counter()  # for scale: the simplest request there is
        (await client.get(m.url + "/v1/models")).raise_for_status()
        times["models"].append(time.perf_counter() - sent)
        times["m"].append(await resume(client, m, ids["memory"][i], after))
        times["a"].append(await resume(client, a, ids["redis"][i], after))
        times["b"].append(await resume(client, b, ids["redis"][i], after))  # a new mirror each time
    p = {k: (ms(percentile(v, 50)), ms(percentile(v, 99))) for k, v in times.items()}
    return {
        "not resumable": {"models_ms_p50": p["models"][0], "models_ms_p99": p["models"][1]},
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


async def measure(s: Settings) -> dict[str, Any]:
    started = time.perf_counter()

    def note(what: str) -> None:
        print(f"resume: {time.perf_counter() - started:3.0f} s  {what}", file=sys.stderr, flush=True)

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
