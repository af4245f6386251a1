"""Run the server in a background thread, for notebooks and scripts.

Strategy
--------
A notebook wants the server and the client in one kernel: the client cells
run on the kernel's own loop (``%autoawait trio``), so the server cannot share
it.  :func:`start_server` runs the app on its own ``trio.run`` in a daemon
thread, binds ``127.0.0.1:0`` (never a port clash between notebooks) and
returns once the URL is known.  The server writes nothing to stdout or stderr
(``app.hypercorn_config`` switches hypercorn's logs off), so nothing it does
lands in a cell's output.  :meth:`BackgroundServer.stop` cancels it through a
trio token and joins the thread (DESIGN §4).

The rest keeps a notebook's cells short:

* :func:`live_tokens` shows an answer growing in place in the cell, one
  display updated as each token arrives (an IPython display handle); outside
  a Jupyter kernel it only collects the text, silently.
* :func:`expect_trace` and :func:`trace_times` are how a cell checks what its
  text claims about a generation's trace, and raise with the whole trace in
  the message when it does not hold, so CI catches a lesson that stopped
  being true.
* :func:`bench_once` is one ``refimpl bench`` measurement (``bench.py``) that
  keeps every client-side sample (the TTFT, ITL and e2e lists), which the
  bench's report reduces to percentiles, so notebook 13 can draw the
  distributions.
* :func:`bench_scenario` is a whole ``refimpl bench <scenario>`` invocation
  (``bench.measure_all``: a fresh server and load process for each run),
  silent and writing no folder, whose :class:`BenchScenario` draws the
  results folder's two plots inline and prints the bench's table.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .app import create_app, serve
from .bench import measure_all, report
from .bench_report import concurrency_figure, latency_figure, table
from .bench_scenarios import WARMUP, settings
from .benchload import BASELINE, Load, Plan, cpu_seconds, run_load, running_server
from .config import Config
from .figures import event_name


@dataclass
class BackgroundServer:
    url: str
    app: object
    _token: trio.lowlevel.TrioToken
    _scope: trio.CancelScope
    _thread: threading.Thread

    @property
    def engine(self):
        return self.app.extensions["refimpl.engine"]

    def trace(self, gen_id: str) -> dict:
        """The trace of one generation, as ``GET /v1/debug/generations/{id}``."""
        return httpx.get(f"{self.url}/v1/debug/generations/{gen_id}").json()

    def stop(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(config: Config | None = None) -> BackgroundServer:
    app = create_app(config)
    started: queue.Queue = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve, app)
                started.put((url, trio.lowlevel.current_trio_token(), scope))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as err:  # report start-up failures to the caller
            started.put(err)

    thread = threading.Thread(target=run, name="refimpl-server", daemon=True)
    thread.start()
    result = started.get(timeout=30)
    if isinstance(result, BaseException):
        raise result
    url, token, scope = result
    return BackgroundServer(url, app, token, scope, thread)


# -- an answer that grows in place ------------------------------------------------
@dataclass
class LiveTokens:
    """One line of a cell's output, rewritten as tokens arrive: the label,
    the seconds since it was made, the token count, and the text so far."""

    label: str = ""
    text: str = ""
    tokens: int = 0  # calls to add() that carried text
    updates: int = 0  # times the display was (re)drawn: 0 outside a kernel
    every: float = 0.05  # at most one redraw per this many seconds, but see end()
    started: float = field(default_factory=time.perf_counter)
    _handle: Any = field(default=None, init=False, repr=False)  # IPython's DisplayHandle
    _drawn: float = field(default=-1.0, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # not installed: stay silent
            return
        if getattr(get_ipython(), "kernel", None) is not None:  # a notebook's kernel, not a terminal
            self._handle = display(self._bundle(), raw=True, display_id=True)
            self.updates = 1

    def add(self, text: str | None) -> None:
        """One event arrived; ``text`` is its content (empty for the role
        chunk, a final chunk or a usage chunk: shown, not counted)."""
        if text:
            self.text += text
            self.tokens += 1
        if time.perf_counter() - self._drawn >= self.every:
            self._draw()

    def end(self, note: str = "") -> None:
        """The stream ended (``note`` says how): draw the last state."""
        self._draw(note)

    def _bundle(self, note: str = "") -> dict[str, str]:
        seconds = time.perf_counter() - self.started
        head = f"{self.label} {seconds:5.2f} s {self.tokens:4} tokens"
        return {"text/plain": f"{head} | {self.text}" + (f"  [{note}]" if note else "")}

    def _draw(self, note: str = "") -> None:
        self._drawn = time.perf_counter()
        if self._handle is not None:
            self._handle.update(self._bundle(note), raw=True)
            self.updates += 1


def live_tokens(label: str = "") -> LiveTokens:
    """A display in the current cell that :meth:`LiveTokens.add` grows in
    place; call :meth:`LiveTokens.end` when the stream ends."""
    return LiveTokens(label)


# -- checks on a trace ------------------------------------------------------------
def expect_trace(trace: dict, *names: str) -> None:
    """Raise unless the trace's events are exactly ``names``, in order; an
    event is written ``name`` or, when it has a detail, ``name(detail)``
    (``done(stop)``, ``cancelled(client_cancel)``)."""
    found = [event_name(e) for e in trace["events"]]
    if found != list(names):
        raise AssertionError(f"trace {trace['id']}: expected {list(names)}, found {found}")


def trace_times(trace: dict) -> dict[str, float]:
    """Seconds from ``accepted`` to the first event of each name (trace stamps
    are on the server's clock: only their differences mean anything)."""
    zero = trace["events"][0]["at"]
    times: dict[str, float] = {}
    for event in trace["events"]:
        times.setdefault(event["name"], event["at"] - zero)
    return times


# -- one bench measurement, every sample kept --------------------------------------
@dataclass
class BenchRun:
    """What one server did under one load (``refimpl bench``'s numbers)."""

    server: str  # a name in benchload.SERVERS: "refimpl", "sse-starlette", ...
    load: Load  # the client's samples: .ttft, .itl, .e2e (seconds), .reads, .errors
    cpu_s: float  # the server's CPU time during the load, from the kernel

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_s / self.load.tokens * 1e6

    @property
    def reads_per_token(self) -> float:
        return self.load.reads / self.load.tokens


async def bench_once(
    server: str,
    *,
    streams: int,
    tokens: int,
    itl_ms: float = 0.0,
    batch_tokens: int = 64,
    fastwrite: bool = True,
    timeout: float = 60.0,
) -> BenchRun:
    """One measurement of ``bench_scenarios.measure`` (a fresh server, two
    warm-up streams, the server's CPU time around the load), keeping the
    ``Load``; the load runs in this process."""
    plan = Plan(streams, tokens, itl_ms=itl_ms, timeout=timeout)
    async with running_server(server, plan, batch_tokens=batch_tokens, fastwrite=fastwrite) as (proc, url):
        await run_load(url, WARMUP, Load())
        load, before = Load(), cpu_seconds(proc.pid)
        await run_load(url, plan, load)
        return BenchRun(server, load, cpu_seconds(proc.pid) - before)


# -- one whole `refimpl bench <scenario>`, its plots inline ------------------------------
@dataclass
class BenchScenario:
    """What ``refimpl bench <scenario>`` measured: ``result`` is what its
    ``results.json`` holds (``result["summary"][str(streams)][server]``: the
    medians), ``samples`` every run's client samples by (server, streams)."""

    result: dict[str, Any]
    samples: dict[tuple[str, int], list[Load]]

    def table(self, streams: int) -> str:
        """The bench's table for one ``--streams``, as it prints it."""
        return table(self.result["summary"][str(streams)], BASELINE)

    def latency(self):
        """``latency.png``'s figure: the CDFs of TTFT and ITL per server."""
        return latency_figure(self.samples, self.result)

    def concurrency(self):
        """``concurrency.png``'s figure: medians against ``--streams``."""
        return concurrency_figure(self.result)


async def _quiet(label: str, tokens: int, count: object) -> None:
    """No progress bar: a cell's output is the table and the plots."""


async def bench_scenario(scenario: str, **options: Any) -> BenchScenario:
    """``refimpl bench <scenario>`` with ``options`` as its command-line
    options would set them (``streams=[10, 30]``, ``servers=[...]``,
    ``ttft_ms=50``...; checked the same way), the load in load processes as
    there; nothing printed, no folder written."""
    s = settings(argparse.Namespace(scenario=scenario, **options))
    runs, samples = await measure_all(s, _quiet)
    return BenchScenario(report(s, runs), samples)
