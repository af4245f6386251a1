"""The load generator in processes of its own: ``refimpl bench --load-procs K``.

Strategy
--------
The client of a streaming benchmark is not free: for every event it parses
SSE and JSON, which on this machine costs about as much CPU as the server
spends making the event (lesson 13).  Past some number of streams one
Python process cannot read them as fast as they come, its event loop's own
queue adds to every latency it stamps, and the bench measures itself.  Two
things guard against that.  Every load process reports the CPU time it used
during the load, so the report shows the client's share of a core beside
the server's, and its *loop lag*: a timer set every 10 ms, and how late
each one woke.  The share is an average over the run; the lag is the
delay that each of the process's own timestamps may carry at that moment,
so it shows a client that falls behind in bursts while its average share
still looks modest (measured here: 200 paced streams in one process, 55%
of a core, TTFT p99 778 ms; the same in two processes, 280 ms).  And the
streams can be split over K processes, each running
:func:`~refimpl.benchload.run_load` on its share.

A load process talks to the bench over its stdin and stdout, one line each::

    load process -> {"ready": PID}           imported, waiting; nothing connected yet
    bench        -> {"go": URL}               to every process, one after the other
    load process -> {"tokens": N}             every 0.25 s, for the progress bar
    load process -> {"load": {...}, "lag": [...]}   its samples, CPU time (a benchload.Load), loop lag

The bench starts the K processes while the server starts (the URL comes
with the go), waits until every one is ready, so that no process's
start-up falls inside the measurement, reads the server's clocks, and then
says go.  The samples are durations, and ``started``/``ended`` are
``time.perf_counter()``, which on Linux is ``CLOCK_MONOTONIC``, one clock
for every process on the machine: so the K loads merge into one
(:meth:`~refimpl.benchload.Load.merge`).  What a process writes to stderr is
kept in a temporary file and shown if it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import IO, Any

import trio

from .bench_report import ms, percentile
from .benchload import Load, Plan, run_load

PROGRESS_EVERY = 0.25  # seconds between two {"tokens": N} lines
LAG_EVERY = 0.01  # seconds between two timers that measure the loop's lag


# -- inside a load process -----------------------------------------------------------
def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def drive(url: str, plan: Plan, load: Load, lag: list[float]) -> None:
    """The load, with a line of progress every :data:`PROGRESS_EVERY` s and
    the loop's lag, how late a timer wakes, every :data:`LAG_EVERY` s."""

    async def report() -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            say({"tokens": load.tokens})

    async def watch_lag() -> None:
        while True:
            due = trio.current_time() + LAG_EVERY
            await trio.sleep_until(due)
            lag.append(trio.current_time() - due)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        nursery.start_soon(watch_lag)
        await run_load(url, plan, load)
        nursery.cancel_scope.cancel()


def main() -> None:
    """``python -m refimpl.bench_client PLAN_JSON``: one share of the load."""
    plan = Plan(**json.loads(sys.argv[1]))
    say({"ready": os.getpid()})
    go = sys.stdin.readline()
    if not go:
        return  # the bench gave up before the start
    load, lag = Load(), []
    try:
        trio.run(drive, json.loads(go)["go"], plan, load, lag)
    except* trio.TooSlowError:
        say({"timed_out": True})
        raise SystemExit(2) from None
    say({"load": asdict(load), "lag": lag})


# -- in the bench ----------------------------------------------------------------------
class Lines:
    """JSON objects, one a line, from a process's stdout (a line may be megabytes)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream, self._ready, self._partial = stream, [], []

    async def next(self) -> dict[str, Any] | None:
        """The next object, or None at the end of the output."""
        while not self._ready:
            chunk = await self._stream.receive_some()
            if not chunk:
                return None
            *lines, rest = chunk.split(b"\n")
            for line in lines:
                self._ready.append(b"".join([*self._partial, line]))
                self._partial = []
            self._partial.append(rest)
        return json.loads(self._ready.pop(0))


@dataclass
class LoadProcess:
    proc: trio.Process
    lines: Lines
    log: IO[bytes]
    streams: int
    tokens: int = 0  # the last count it reported
    done: bool = False  # it sent its results, and is exiting

    def failed(self, what: str) -> RuntimeError:
        self.log.seek(0)
        return RuntimeError(f"load process {self.proc.pid} {what}:\n{self.log.read().decode()[-2000:]}")


class LoadProcesses:
    """K load processes: :meth:`ready` waits for all, :meth:`run` starts them together."""

    def __init__(self, procs: list[LoadProcess]) -> None:
        self.procs = procs

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.procs)

    async def ready(self) -> None:
        with trio.fail_after(60):
            for p in self.procs:
                if (await p.lines.next() or {}).get("ready") != p.proc.pid:
                    raise p.failed("did not start")

    async def run(self, url: str) -> tuple[Load, list[dict[str, Any]]]:
        """Say go, collect; returns the merged load and each process's CPU figures."""
        go = json.dumps({"go": url}).encode() + b"\n"
        for p in self.procs:
            await p.proc.stdin.send_all(go)
        results: list[dict[str, Any]] = [{} for _ in self.procs]
        async with trio.open_nursery() as nursery:
            for p, result in zip(self.procs, results, strict=True):
                nursery.start_soon(self._collect, p, result)
        loads = [Load(**r["load"]) for r in results]
        shares = []
        for p, load, r in zip(self.procs, loads, results, strict=True):
            wall = load.ended - load.started
            share = {"pid": p.proc.pid, "streams": p.streams, "cpu_s": round(load.cpu_s, 6)}
            share |= {"wall_s": round(wall, 6), "cpu_share": round(load.cpu_s / wall, 4)}
            share |= {f"lag_ms_p{q}": ms(percentile(r["lag"], q)) for q in (50, 99)}
            shares.append({**share, "lag_ms_max": ms(max(r["lag"], default=None))})
        return Load.merge(loads), shares

    @staticmethod
    async def _collect(p: LoadProcess, result: dict[str, Any]) -> None:
        while (line := await p.lines.next()) is not None:
            if "tokens" in line:
                p.tokens = line["tokens"]
            elif line.get("timed_out"):
                raise trio.TooSlowError  # as run_load raises it in the bench's own process
            else:
                result.update(line)
                p.tokens, p.done = line["load"]["tokens"], True
                return
        raise p.failed("ended without its results")


def shares(plan: Plan, k: int) -> list[Plan]:
    """``plan`` split over ``k`` processes, as evenly as it goes, streams numbered on."""
    sizes = [plan.streams // k + (i < plan.streams % k) for i in range(k)]
    starts = [plan.first + sum(sizes[:i]) for i in range(k)]
    return [Plan(**{**asdict(plan), "streams": n, "first": s}) for n, s in zip(sizes, starts, strict=True)]


@asynccontextmanager
async def load_processes(plan: Plan, k: int) -> AsyncIterator[LoadProcesses]:
    """Start ``k`` load processes (not waiting for them); always stop them."""
    started: list[LoadProcess] = []
    with ExitStack() as logs:
        try:
            for share in shares(plan, k):
                cmd = [sys.executable, "-m", "refimpl.bench_client", json.dumps(asdict(share))]
                log = logs.enter_context(tempfile.TemporaryFile())
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
                proc = await trio.lowlevel.open_process(cmd, **pipes)
                started.append(LoadProcess(proc, Lines(proc.stdout), log, share.streams))
            yield LoadProcesses(started)
        finally:
            with trio.CancelScope(shield=True):
                for p in started:
                    if not p.done:  # the bench is leaving early
                        p.proc.kill()
                    await p.proc.wait()
                    await p.proc.stdin.aclose()
                    await p.proc.stdout.aclose()


if __name__ == "__main__":
    main()
