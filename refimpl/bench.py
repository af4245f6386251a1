"""``refimpl bench``: what one streamed token costs, next to a peer server.

Strategy
--------
The overhead scenario (lesson 13): N concurrent streams of M tokens with a
model that takes no time at all (``itl_ms 0``, ``ttft_ms 0``), so everything
the server spends is *streaming* cost, not model cost.  In one invocation the
same load runs against two servers:

* ``refimpl``: this project, Quart-Trio on hypercorn's trio worker;
* ``peer``: FastAPI + sse-starlette on uvicorn, written the ordinary way,
  streaming the same tokens in the same chunk format.

This module is the experiment and its report; the instruments (starting and
stopping the servers, their CPU time from ``/proc``, the load generator with
its client-side timestamps) are in ``benchload.py``.  One measurement starts
a fresh server, warms it up (2 short streams), then reads the server's CPU
time before and after the load and divides by the tokens received.  On a
two-core machine the client competes with the server for CPU, which distorts
*latencies*, but the kernel's account of the server's own CPU time is not
affected by it.  To keep runs comparable the servers run alternately, and
``--repeat`` reports the median of each number.  The report is a table on
stdout and a JSON file with the configuration, the machine, every run, the
medians and the command line that repeats the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from .benchload import SERVERS, Load, cpu_seconds, run_load, running_server


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure cost per token against an sse-starlette peer")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (1-1000)")
    p.add_argument("--tokens", type=int, default=2000, help="content tokens per stream")
    p.add_argument("--itl-ms", type=float, default=0.0, help="simulated delay between tokens")
    p.add_argument("--repeat", type=int, default=1, help="runs per server; the median is reported")
    p.add_argument("--only", choices=SERVERS, help="measure one server only")
    p.add_argument(
        "--fastwrite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refimpl's hypercorn write fast path (REFIMPL_FASTWRITE)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=64,
        help="refimpl: most ready tokens per write (1: one write per token, like the peer)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one load run")
    p.add_argument(
        "--json", type=Path, default=None, help="results file (default bench-results/bench-<timestamp>.json)"
    )
    p.set_defaults(run=run)
    # Other scenarios are subcommands of ``bench``, and optional ones: with
    # none, ``refimpl bench [options]`` is the overhead scenario above.  A
    # subcommand's own defaults (its ``run``) replace the ones set here.
    from .bench_backpressure import add_parser as add_backpressure_parser  # (they import this module)
    from .bench_cancel import add_parser as add_cancel_parser

    scenarios = p.add_subparsers(dest="scenario", title="other scenarios", metavar="{cancel,backpressure}")
    add_cancel_parser(scenarios)
    add_backpressure_parser(scenarios)


async def show_progress(label: str, load: Load, total: int) -> None:
    """A one-line progress bar on stderr, redrawn in place (only on a terminal)."""
    if not sys.stderr.isatty():
        print(f"{label} ...", file=sys.stderr, flush=True)
        return
    try:
        while True:
            done = load.tokens / total
            bar = "#" * int(30 * done)
            print(
                f"\r{label} [{bar:<30}] {load.tokens:,}/{total:,} tokens", end="", file=sys.stderr, flush=True
            )
            await trio.sleep(0.25)
    finally:
        print(f"\r{label} [{'#' * 30}] {load.tokens:,}/{total:,} tokens", file=sys.stderr, flush=True)


# -- one measurement, and the report ------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def measure(kind: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    async with running_server(kind, args) as (proc, url):
        warm = argparse.Namespace(**{**vars(args), "streams": 2, "tokens": min(args.tokens, 200)})
        await run_load(url, warm, Load())  # imports, caches, first connections
        load = Load()
        cpu_before = cpu_seconds(proc.pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_progress, label, load, args.streams * args.tokens)
            await run_load(url, args, load)
            nursery.cancel_scope.cancel()
        cpu = cpu_seconds(proc.pid) - cpu_before
        wall = time.perf_counter() - load.started
    return {
        "server": kind,
        "streams": args.streams,
        "tokens": load.tokens,
        "errors": load.errors,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(load.tokens / wall, 1),
        "server_cpu_s": round(cpu, 6),
        "cpu_us_per_token": round(cpu / load.tokens * 1e6, 3) if load.tokens else None,
        "client_reads": load.reads,
        "ttft_ms_p50": ms(percentile(load.ttft, 50)),
        "ttft_ms_p99": ms(percentile(load.ttft, 99)),
        "itl_ms_p50": ms(percentile(load.itl, 50)),
        "itl_ms_p99": ms(percentile(load.itl, 99)),
        "e2e_ms_p50": ms(percentile(load.e2e, 50)),
    }


METRICS = (
    "tokens_per_s",
    "cpu_us_per_token",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "e2e_ms_p50",
    "client_reads",
)


def summarize(runs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    mine = [r for r in runs if r["server"] == kind]
    out: dict[str, Any] = {"runs": len(mine), "tokens": mine[0]["tokens"]}
    for m in METRICS:
        values = [r[m] for r in mine if r[m] is not None]
        out[m] = statistics.median(values) if values else None
    return out


def cell(value: float | None) -> str:
    if value is None:
        return f"{'-':>14}"
    return f"{value:>14,.0f}" if value >= 1000 or float(value).is_integer() else f"{value:>14,.2f}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    kinds = list(summary)
    rows = [f"{'':20}" + "".join(f"{k:>14}" for k in kinds)]
    for m in ("tokens", *METRICS):
        cells = "".join(cell(summary[k][m]) for k in kinds)
        rows.append(f"{m:20}{cells}")
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    versions = {}
    for dist in (
        "trio",
        "hypercorn",
        "quart",
        "quart-trio",
        "uvicorn",
        "fastapi",
        "sse-starlette",
        "starlette",
        "httpx",
        "h11",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run (what the lesson's table cites)."""
    cmd = (
        f"refimpl bench --streams {args.streams} --tokens {args.tokens}"
        f" --itl-ms {args.itl_ms:g} --repeat {args.repeat}"
    )
    if args.only:
        cmd += f" --only {args.only}"
    if args.batch_tokens != 64:
        cmd += f" --batch-tokens {args.batch_tokens}"
    return cmd + ("" if args.fastwrite else " --no-fastwrite")


async def run(args: argparse.Namespace) -> int:
    if not (1 <= args.streams <= 1000 and args.tokens >= 1 and args.repeat >= 1):
        raise SystemExit("need 1 <= --streams <= 1000, --tokens >= 1, --repeat >= 1")
    kinds = [args.only] if args.only else list(SERVERS)
    runs = []
    timed_out = False
    try:
        for r in range(args.repeat):
            # Alternate the order so neither server always runs on a "warmer" machine.
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                runs.append(await measure(kind, f"{kind:>8} run {r + 1}/{args.repeat}", args))
    except* trio.TooSlowError:  # the servers are already stopped
        timed_out = True
    if timed_out:
        print(f"\nerror: a load run took longer than --timeout {args.timeout:g} s", file=sys.stderr)
        return 2
    summary = {k: summarize(runs, k) for k in kinds}
    ratio = None
    if len(kinds) == 2 and all(summary[k]["cpu_us_per_token"] for k in kinds):
        ratio = round(summary["refimpl"]["cpu_us_per_token"] / summary["peer"]["cpu_us_per_token"], 3)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(args),
        "config": {
            "streams": args.streams,
            "tokens": args.tokens,
            "itl_ms": args.itl_ms,
            "ttft_ms": 0,
            "repeat": args.repeat,
            "fastwrite": args.fastwrite,
            "batch_tokens": args.batch_tokens,
        },
        "machine": environment(),
        "runs": runs,
        "summary": summary,
        "ratio_cpu_us_per_token": ratio,
    }
    path = args.json or Path("bench-results") / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{args.streams} streams x {args.tokens} tokens, itl {args.itl_ms} ms, "
        f"{args.repeat} run(s) each, medians ({os.cpu_count()} CPUs):"
    )
    print(table(summary))
    if ratio is not None:
        print(f"\nserver CPU per token, refimpl / peer: {ratio:.2f}")
    print(f"results: {path}")
    errors = [e for r in runs for e in r["errors"]]
    for e in errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0
