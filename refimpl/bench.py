"""``refimpl bench``: what one streamed token costs, next to a peer server.

Strategy
--------
The overhead scenario (lesson 13): N concurrent streams of M tokens with a
model that takes no time at all (``itl_ms 0``, ``ttft_ms 0``), so everything
the server spends is *streaming* cost, not model cost.  In one invocation the
same load runs against two servers, each started as a subprocess on
127.0.0.1:

* ``refimpl``: ``python -m refimpl serve`` (Quart-Trio on hypercorn's trio
  worker, this project);
* ``peer``: ``bench/peers/sse_starlette_server.py``, FastAPI + sse-starlette
  on uvicorn, written the ordinary way, streaming the same tokens in the same
  chunk format.

The load generator is this process: one httpx client, N streams, each read to
the end and parsed with our sans-IO :class:`~refimpl.sse.SSEParser`; every
content token gets a client-side timestamp, from which come TTFT, ITL and
end-to-end latency.  Server cost is read from the kernel, not from the
client's clock: the CPU time of the server's threads in
``/proc/PID/task/*/schedstat`` (nanoseconds) before and after the load,
divided by the tokens received.  On a two-core
machine the client competes with the server for CPU, which distorts
*latencies*, but the kernel's account of the server's own CPU time is not
affected by it.  To keep runs comparable the servers run alternately, each
on a fresh process after a warm-up, and ``--repeat`` reports the median.

Everything is bounded: only 127.0.0.1, at most ``--streams`` connections, a
deadline on every phase, and the servers are stopped (SIGTERM, then SIGKILL)
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import trio

from .sse import SSEParser

SERVERS = ("refimpl", "peer")
PEER = Path(__file__).resolve().parent.parent / "bench" / "peers" / "sse_starlette_server.py"
HOST = "127.0.0.1"  # the bench never talks to anything else
CLK_TCK = os.sysconf("SC_CLK_TCK")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure cost per token against an sse-starlette peer")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (1-1000)")
    p.add_argument("--tokens", type=int, default=2000, help="content tokens per stream")
    p.add_argument("--itl-ms", type=float, default=0.0, help="simulated delay between tokens")
    p.add_argument("--repeat", type=int, default=1, help="runs per server; the median is reported")
    p.add_argument("--only", choices=SERVERS, help="measure one server only")
    p.add_argument("--fastwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="refimpl's hypercorn write fast path (REFIMPL_FASTWRITE)")
    p.add_argument("--batch-tokens", type=int, default=64,
                   help="refimpl: most ready tokens per write (1: one write per token, like the peer)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one load run")
    p.add_argument("--json", type=Path, default=None,
                   help="results file (default bench-results/bench-<timestamp>.json)")
    p.set_defaults(run=run)


# -- the server side -----------------------------------------------------------
# region: server-cpu
def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (all its threads), from the kernel.

    ``/proc/PID/task/TID/schedstat`` counts each thread's time on a CPU in
    nanoseconds; ``/proc/PID/stat`` (utime + stime, fields 14 and 15) only in
    clock ticks of 1/``SC_CLK_TCK`` s, too coarse for a short run, so it is
    the fallback where schedstat is missing.  The command name (field 2) may
    contain spaces, so ``stat`` is split after its closing parenthesis.
    """
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
# endregion: server-cpu


def server_command(kind: str, port: int, tokens: int, itl_ms: float, batch_tokens: int = 64) -> list[str]:
    knobs = ["--host", HOST, "--port", str(port), "--itl-ms", str(itl_ms),
             "--ttft-ms", "0", "--tokens", str(tokens)]
    if kind == "refimpl":
        return [sys.executable, "-m", "refimpl", "serve", *knobs, "--batch-tokens", str(batch_tokens)]
    if not PEER.exists():
        raise SystemExit(f"the peer server is not at {PEER} (run from a source checkout)")
    return [sys.executable, str(PEER), *knobs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@asynccontextmanager
async def running_server(kind: str, args: argparse.Namespace) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start one server, wait until it answers, and always stop it."""
    port = free_port()
    env = {**os.environ, "REFIMPL_FASTWRITE": "1" if args.fastwrite else "0"}
    with tempfile.TemporaryFile() as log:
        cmd = server_command(kind, port, args.tokens, args.itl_ms, args.batch_tokens)
        proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log, env=env)
        try:
            url = f"http://{HOST}:{port}"
            await wait_until_up(proc, url, log)
            yield proc, url
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def wait_until_up(proc: trio.Process, url: str, log: Any) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.move_on_after(30):
            while proc.returncode is None:
                try:
                    if (await client.get(url + "/v1/models")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
    log.seek(0)
    raise SystemExit(f"{proc.args[:4]} did not come up on {url}:\n{log.read().decode()[-2000:]}")


# -- the client side -----------------------------------------------------------
@dataclass
class Load:
    """What the client saw during one load run."""

    started: float = 0.0
    tokens: int = 0
    reads: int = 0  # network reads that delivered bytes (how batched the wire was)
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)


def request_body(i: int, tokens: int, itl_ms: float) -> dict[str, Any]:
    return {
        "model": "refimpl-sim",
        "messages": [{"role": "user", "content": f"bench stream {i}"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "simulate": {"tokens": tokens, "itl_ms": itl_ms, "ttft_ms": 0},
    }


# region: bench-stream
async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], load: Load) -> None:
    """Read one whole stream, stamping every content token when it arrived."""
    start = time.perf_counter()
    stamps: list[float] = []
    parser, done, usage = SSEParser(), False, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                load.errors.append(f"HTTP {resp.status_code}")
                return
            async for raw in resp.aiter_raw():
                now = time.perf_counter()  # every event in this read arrived now
                load.reads += 1
                for event in parser.feed(raw):
                    if event.data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(event.data)
                    usage = chunk.get("usage") or usage
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(now)
                        load.tokens += 1
    except httpx.HTTPError as err:  # counted, reported, and the run goes on
        load.errors.append(f"{type(err).__name__}: {err}")
    want = body["simulate"]["tokens"]
    if not done or len(stamps) != want or (usage or {}).get("completion_tokens") != want:
        load.errors.append(f"stream {body['messages'][0]['content']}: {len(stamps)}/{want} tokens, done={done}")
    if stamps:
        load.ttft.append(stamps[0] - start)
        load.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))
        load.e2e.append(time.perf_counter() - start)
# endregion: bench-stream


async def run_load(url: str, args: argparse.Namespace, load: Load) -> None:
    limits = httpx.Limits(max_connections=args.streams, max_keepalive_connections=args.streams)
    timeout = httpx.Timeout(30, read=60)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        with trio.fail_after(args.timeout):
            async with trio.open_nursery() as nursery:
                load.started = time.perf_counter()
                for i in range(args.streams):
                    nursery.start_soon(one_stream, client, url, request_body(i, args.tokens, args.itl_ms), load)


async def show_progress(label: str, load: Load, total: int) -> None:
    """A one-line progress bar on stderr, redrawn in place (only on a terminal)."""
    if not sys.stderr.isatty():
        print(f"{label} ...", file=sys.stderr, flush=True)
        return
    try:
        while True:
            done = load.tokens / total
            bar = "#" * int(30 * done)
            print(f"\r{label} [{bar:<30}] {load.tokens:,}/{total:,} tokens", end="", file=sys.stderr, flush=True)
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


METRICS = ("tokens_per_s", "cpu_us_per_token", "ttft_ms_p50", "ttft_ms_p99",
           "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50", "client_reads")


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
    for dist in ("trio", "hypercorn", "quart", "quart-trio", "uvicorn", "fastapi",
                 "sse-starlette", "starlette", "httpx", "h11"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run (what the lesson's table cites)."""
    cmd = (f"refimpl bench --streams {args.streams} --tokens {args.tokens}"
           f" --itl-ms {args.itl_ms:g} --repeat {args.repeat}")
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
        "config": {"streams": args.streams, "tokens": args.tokens, "itl_ms": args.itl_ms, "ttft_ms": 0,
                   "repeat": args.repeat, "fastwrite": args.fastwrite, "batch_tokens": args.batch_tokens},
        "machine": environment(),
        "runs": runs,
        "summary": summary,
        "ratio_cpu_us_per_token": ratio,
    }
    path = args.json or Path("bench-results") / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.streams} streams x {args.tokens} tokens, itl {args.itl_ms} ms, "
          f"{args.repeat} run(s) each, medians ({os.cpu_count()} CPUs):")
    print(table(summary))
    if ratio is not None:
        print(f"\nserver CPU per token, refimpl / peer: {ratio:.2f}")
    print(f"results: {path}")
    errors = [e for r in runs for e in r["errors"]]
    for e in errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0
