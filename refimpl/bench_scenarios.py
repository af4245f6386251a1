"""The streaming scenarios of ``refimpl bench``, and one measurement of a server under one.

Strategy
--------
A scenario is a load (:class:`~refimpl.benchload.Plan`) with defaults of its
own, run the same way against every server of ``--servers``:

``overhead``  (also ``refimpl bench`` with no scenario) 32 streams × 2,000
              tokens from a model that takes no time: what streaming itself
              costs, lesson 13's headline.
``paced``     200 streams × 200 tokens, ttft 200 ms, itl 20 ms: a model that
              makes every stream wait, as a real one does, so every token is
              a timed wake-up and a write of its own (the issue's scenario b).
``burst``     500 clients arriving at once for 20 tokens each: what taking
              on connections costs.  Read TTFT from the connect, the TCP
              connect time, the set-up failures and the listen queue
              overflows.

Every option changes any of them; ``cancel`` and ``backpressure`` (alias
``disconnect`` and ``stalled``) are measurements of another kind, in
``bench_cancel.py`` and ``bench_backpressure.py``.  ``--workers 1 2`` measures
refimpl twice, as one process and as ``refimpl serve --workers 2``: each
value is a column of its own (``refimpl``, ``refimpl×2``, :meth:`Settings.variants`)
beside the peers, which stay one process each.

One measurement (:func:`measure`) starts the server fresh and warms it up
(2 short streams a worker from this process: imports, caches, first
connections; which worker takes each is the kernel's choice),
then starts the load processes (``bench_client.py``) and waits until they
are ready, so that their start-up is not measured.  Then it reads the
server's CPU time (schedstat), its memory (VmRSS, and VmHWM, the peak the
kernel keeps) and the kernel's listen-queue overflow count, releases the
load, samples VmRSS every 50 ms until the load ends, and reads all of it
again.  The server is its process tree, read once it is up (a parent and
its workers; one process for the rest), and CPU and memory are sums over
it.  The peak is the largest sample, or VmHWM if that rose during the
load (a peak between two samples); the memory *per concurrent stream* is
the peak minus the RSS before the load, over the streams, which is what
limits how many streams one server holds.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .bench_client import load_processes
from .bench_report import figures
from .benchload import (
    BASELINE,
    SERVERS,
    Load,
    Plan,
    cpu_seconds,
    label,
    listen_overflows,
    memory_kib,
    process_tree,
    run_load,
    running_server,
)

MAX_STREAMS = 10_000
RSS_EVERY = 0.05  # seconds between two samples of the server's VmRSS
WARMUP = Plan(streams=2, tokens=200)  # per worker; a model that never waits: over in moments


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a streaming scenario runs with: its own defaults, then the options given."""

    scenario: str
    streams: tuple[int, ...]  # one load of each size, in this order
    tokens: int
    ttft_ms: float
    itl_ms: float
    servers: tuple[str, ...] = ("refimpl", BASELINE)
    repeat: int = 1
    load_procs: int = 1
    fastwrite: bool = True
    batch_tokens: int = 64
    workers: tuple[int, ...] = (1,)  # refimpl's: one column per value
    backlog: int | None = None  # refimpl's; None: its own default
    timeout: float = 300.0  # seconds one load may take

    def plan(self, streams: int) -> Plan:
        return Plan(streams, self.tokens, self.ttft_ms, self.itl_ms, self.timeout)

    def variants(self) -> dict[str, tuple[str, int]]:
        """The servers as measured, in order: label -> (server, worker
        processes); refimpl once per ``--workers`` value, each peer once."""
        return {
            label(server, n): (server, n)
            for server in self.servers
            for n in (self.workers if server == "refimpl" else (1,))
        }


SCENARIOS = {
    "overhead": Settings("overhead", (32,), tokens=2000, ttft_ms=0, itl_ms=0),
    "paced": Settings("paced", (200,), tokens=200, ttft_ms=200, itl_ms=20),
    "burst": Settings("burst", (500,), tokens=20, ttft_ms=200, itl_ms=20),
}
HELP = {
    "overhead": "streaming cost, with a model that takes no time (the default)",
    "paced": "a model that makes the streams wait, like a real one",
    "burst": "many clients arriving at once: connecting, set-up failures, TTFT",
}


def add_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options of a streaming scenario.  None has a default in the parser
    (``argparse.SUPPRESS``: an option not given is not in the namespace), and
    :func:`settings` fills in the scenario's, so that ``refimpl bench
    --tokens 50 paced`` keeps its 50.  The help says each default."""
    d = SCENARIOS[name]
    add = partial(p.add_argument, default=argparse.SUPPRESS)
    streams = " ".join(map(str, d.streams))
    add(
        "--streams",
        type=int,
        nargs="+",
        help=f"concurrent streams; several: one load each (default {streams})",
    )
    add("--tokens", type=int, help=f"content tokens per stream (default {d.tokens})")
    add("--ttft-ms", type=float, help=f"the model's delay before the first token (default {d.ttft_ms:g})")
    add("--itl-ms", type=float, help=f"the model's delay between tokens (default {d.itl_ms:g})")
    servers = " ".join(d.servers)
    add("--servers", nargs="+", choices=list(SERVERS), help=f"the servers to measure (default {servers})")
    add("--repeat", type=int, help="runs of each server, alternating; medians are reported (default 1)")
    add("--load-procs", type=int, help="load-generator processes to split the streams over (default 1)")
    add(
        "--fastwrite",
        action=argparse.BooleanOptionalAction,
        help="refimpl's hypercorn write fast path, REFIMPL_FASTWRITE (default on)",
    )
    add("--batch-tokens", type=int, help="refimpl: the most ready tokens per write (default 64)")
    add(
        "--workers",
        type=int,
        nargs="+",
        metavar="N",
        help="refimpl: serve --workers N; several: a column each, refimpl×N (default 1)",
    )
    add("--backlog", type=int, metavar="N", help="refimpl: serve --backlog N (default: refimpl's own)")
    add("--timeout", type=float, help=f"seconds one load may take (default {d.timeout:g})")
    add("--out", type=Path, help="the results folder (default bench-results/<scenario>-<timestamp>/)")


def settings(args: argparse.Namespace) -> Settings:
    """The scenario's defaults, with the options given; raises SystemExit on impossible ones."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(Settings)
        if f.name != "scenario" and hasattr(args, f.name)
    }
    for many in ("streams", "servers", "workers"):
        if many in given:
            given[many] = tuple(dict.fromkeys(given[many]))  # each once, in the order given
    s = replace(SCENARIOS[args.scenario or "overhead"], **given)
    if not all(1 <= n <= MAX_STREAMS for n in s.streams):
        raise SystemExit(f"need 1 <= --streams <= {MAX_STREAMS:,}")
    if s.tokens < 1 or s.repeat < 1 or min(s.ttft_ms, s.itl_ms) < 0 or s.batch_tokens < 1:
        raise SystemExit("need --tokens, --repeat, --batch-tokens >= 1 and --ttft-ms, --itl-ms >= 0")
    if not 1 <= s.load_procs <= min(s.streams):
        raise SystemExit("need 1 <= --load-procs <= the fewest --streams")
    if min(s.workers) < 1 or (s.backlog is not None and s.backlog < 1):
        raise SystemExit("need --workers and --backlog >= 1")
    if s.workers != (1,) and "refimpl" not in s.servers:
        raise SystemExit("--workers is refimpl's: add refimpl to --servers")
    return s


# -- one measurement --------------------------------------------------------------------
async def measure(
    variant: str, streams: int, s: Settings, show: Callable[[Callable[[], int]], Awaitable[None]]
) -> tuple[dict[str, Any], Load]:
    """The server ``variant`` (a label of :meth:`Settings.variants`) under
    ``streams`` streams: its figures (``bench_report.figures``) and the
    clients' samples.  ``show(count)`` draws progress until cancelled."""
    plan = s.plan(streams)
    server, workers = s.variants()[variant]
    knobs = {"batch_tokens": s.batch_tokens, "fastwrite": s.fastwrite, "backlog": s.backlog}
    server_up = running_server(server, plan, workers=workers, **knobs)
    async with load_processes(plan, s.load_procs) as procs, server_up as (proc, url):
        pids = process_tree(proc.pid)  # up: with --workers, every worker serves
        await run_load(url, replace(WARMUP, streams=WARMUP.streams * workers), Load())
        await procs.ready()
        rss_before, hwm_before = memory_kib(*pids)
        samples = [rss_before]
        overflows_before, cpu_before = listen_overflows(), cpu_seconds(*pids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show, lambda: procs.tokens)
            nursery.start_soon(sample_rss, pids, samples)
            load, clients = await procs.run(url)
            nursery.cancel_scope.cancel()
        readings = {
            "cpu_s": cpu_seconds(*pids) - cpu_before,
            "listen_overflows": listen_overflows() - overflows_before,
            "rss_before_kib": rss_before,
        }
        rss_after, hwm_after = memory_kib(*pids)
    # VmHWM is the peak since the server started: it says something about
    # the load only if the load raised it (a peak between two samples).
    readings["rss_peak_kib"] = max(*samples, rss_after, hwm_after if hwm_after > hwm_before else 0)
    run = {"server": variant, "streams": streams, "workers": workers, "server_pids": pids}
    return {**run, **figures(load, plan, readings, clients)}, load


async def sample_rss(pids: list[int], samples: list[int]) -> None:
    while True:
        await trio.sleep(RSS_EVERY)
        samples.append(memory_kib(*pids)[0])
