"""``refimpl bench``: what streaming costs, in named scenarios, next to peer servers.

Strategy
--------
A cost means little alone; it means something next to an ordinary server
doing the same job.  So in one invocation the same load runs against each
server of ``--servers``, each a fresh subprocess on 127.0.0.1:

* ``refimpl``: this project, Quart-Trio on hypercorn's trio worker;
* ``sse-starlette``: FastAPI + sse-starlette on uvicorn, the baseline every
  ratio is taken against; ``starlette``: a plain Starlette
  ``StreamingResponse`` on uvicorn; ``quart-asyncio``: Quart on hypercorn's
  asyncio worker.  Each is written the ordinary way for its stack, streams
  the same tokens in the same chunk format, and lives in ``bench/peers/``;
  side by side they show what the framework, the event loop and the SSE
  library each cost.

With ``--workers 1 2`` refimpl is measured twice, as one process
(``refimpl``) and as ``refimpl serve --workers 2`` (``refimpl×2``), each a
column of its own, and a line under the table gives the scaling from one
worker to two.  The peers stay one process each: uvicorn and hypercorn can
run several workers too, but the comparison to read is refimpl against the
peers, and refimpl×2 against refimpl.

The scenarios are ``overhead`` (the default), ``paced`` and ``burst``
(``bench_scenarios.py``), and two measurements of another kind, ``cancel``
(alias ``disconnect``: how soon a client's hang-up stops the model) and
``backpressure`` (alias ``stalled``: the server's memory while a client
reads nothing); ``protocols`` (lesson 12), ``resume`` (lesson 11) and
``faults`` (lesson 14: misbehaving clients against one server, and the
invariants that must hold) have modules of their own.  This module is the command: it runs every server at every
``--streams``, ``--repeat`` times with the servers' order alternating, so
that neither always runs on a "warmer" machine, draws a progress bar on
stderr, prints the table of medians on stdout and writes the results folder
(``bench_report.py``).  The instruments are in ``benchload.py`` and
``bench_client.py``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .bench_report import environment, ms, percentile, summarize, table, write_plots, write_results
from .bench_scenarios import HELP, SCENARIOS, Settings, add_options, measure, settings
from .benchload import BASELINE, Load

__all__ = ["add_parser", "environment", "ms", "percentile", "run"]  # the stats serve bench_cancel & co.


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure streaming cost against peer servers, by scenario")
    add_options(p, "overhead")  # `refimpl bench [options]`: the overhead scenario
    p.set_defaults(run=run)
    from .bench_backpressure import add_parser as add_backpressure_parser  # (they import this module)
    from .bench_cancel import add_parser as add_cancel_parser
    from .bench_faults import add_parser as add_faults_parser
    from .bench_protocols import add_parser as add_protocols_parser
    from .bench_resume import add_parser as add_resume_parser

    scenarios = p.add_subparsers(dest="scenario", title="scenarios")
    for name in SCENARIOS:
        add_options(scenarios.add_parser(name, help=HELP[name]), name)
    add_cancel_parser(scenarios)
    add_backpressure_parser(scenarios)
    add_protocols_parser(scenarios)
    add_resume_parser(scenarios)
    add_faults_parser(scenarios)


async def show_progress(label: str, total: int, count: Callable[[], int]) -> None:
    """A one-line progress bar on stderr, redrawn in place (only on a terminal)."""
    if not sys.stderr.isatty():
        print(f"{label} ...", file=sys.stderr, flush=True)
        return
    started = time.perf_counter()

    def draw(end: str = "") -> None:
        done = min(count(), total)
        bar = "#" * (30 * done // total)
        seconds = time.perf_counter() - started
        print(f"\r{label} [{bar:<30}] {done:,}/{total:,} tokens {seconds:5.1f} s", end=end, file=sys.stderr)

    try:
        while True:
            draw()
            await trio.sleep(0.25)
    finally:
        draw("\n")


def command_line(s: Settings) -> str:
    """The command that repeats this run (what a lesson's table cites)."""
    cmd = (
        f"refimpl bench {s.scenario} --streams {' '.join(map(str, s.streams))} --tokens {s.tokens}"
        f" --ttft-ms {s.ttft_ms:g} --itl-ms {s.itl_ms:g} --servers {' '.join(s.servers)}"
        f" --repeat {s.repeat} --load-procs {s.load_procs}"
    )
    if s.workers != (1,):
        cmd += f" --workers {' '.join(map(str, s.workers))}"
    if s.backlog is not None:
        cmd += f" --backlog {s.backlog}"
    if s.batch_tokens != 64:
        cmd += f" --batch-tokens {s.batch_tokens}"
    return cmd + ("" if s.fastwrite else " --no-fastwrite")


def enough_files(s: Settings) -> None:
    """Every stream is a socket at both ends: raise the soft limit on open
    files as far as the hard one allows (the servers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max(s.streams) + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


async def measure_all(
    s: Settings, progress: Callable[[str, int, Callable[[], int]], Awaitable[None]] = show_progress
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list[Load]]]:
    """Every server at every ``--streams``, ``--repeat`` times with the
    servers' order alternating: each run's figures, and every run's client
    samples by (server, streams), for the plots.  ``progress(label, tokens,
    count)`` draws one run's progress until cancelled."""
    runs: list[dict[str, Any]] = []
    samples: dict[tuple[str, int], list[Load]] = {}
    order = [(r, n) for r in range(s.repeat) for n in s.streams]
    servers = list(s.variants())  # the columns: refimpl once per --workers, the peers
    total = len(order) * len(servers)
    for r, streams in order:
        for server in servers if r % 2 == 0 else servers[::-1]:
            label = f"[{len(runs) + 1}/{total}] {server} {streams} streams, run {r + 1}"
            show = partial(progress, label, streams * s.tokens)
            figures, load = await measure(server, streams, s, show)
            runs.append({**figures, "run": r + 1})
            samples.setdefault((server, streams), []).append(load)
    return runs, samples


def report(s: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``results.json`` holds (but the plots' names): the settings, the
    machine, every run, and the medians and ratios (``bench_report``)."""
    variants = s.variants()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(s),
        "config": {**asdict(s), "variants": variants, "baseline": BASELINE},
        "machine": environment(),
        "runs": runs,
        "summary": summarize(runs, BASELINE, variants),
    }


async def run(args: argparse.Namespace) -> int:
    s = settings(args)
    enough_files(s)
    folder = (
        getattr(args, "out", None) or Path("bench-results") / f"{s.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    timed_out = False
    try:
        runs, samples = await measure_all(s)
    except* trio.TooSlowError:  # the servers are already stopped
        timed_out = True
    if timed_out:
        print(f"\nerror: a load run took longer than --timeout {s.timeout:g} s", file=sys.stderr)
        return 2
    result = report(s, runs)
    folder.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(folder, samples, result)
    path = write_results(folder, result)
    for streams, servers in result["summary"].items():
        print(
            f"\n{s.scenario}: {streams} streams x {s.tokens} tokens, ttft {s.ttft_ms:g} ms, itl {s.itl_ms:g} ms;"
            f" {s.repeat} run(s) each, medians; {os.cpu_count()} CPUs, {s.load_procs} load process(es)"
        )
        print(table(servers, BASELINE))
    if BASELINE in s.servers and len(servers) > 1:
        print(f"\n(×: ratio to {BASELINE}, the same figure)")
    if max(s.workers) > 1 and "refimpl" in s.servers:
        print(
            "(refimpl×N: `refimpl serve --workers N`, N processes on one listening socket; its CPU and"
            " RSS are summed\n over the parent and the workers.  The peers run as one process each:"
            " uvicorn and hypercorn could run\n several workers, here they do not.  Compare refimpl with"
            f" the peers, and refimpl×N with refimpl.  Server and\n load generator share these"
            f" {os.cpu_count()} CPUs: see the client CPU rows.)"
        )
    print(
        f"$ {result['command']}\nresults: {path}" + "".join(f"\nplot: {folder / p}" for p in result["plots"])
    )
    errors = [e for r in runs for e in r["error_messages"]]
    for e in errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if any(r["errors"] for r in runs) else 0
