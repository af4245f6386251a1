"""The apparatus of ``refimpl bench``: the servers it measures, and the load.

Strategy
--------
``bench.py`` decides *what* to measure and ``bench_report.py`` reports it;
this module holds the instruments they measure with (lesson 13, "What is
measured, and where").

The servers.  Each runs as a subprocess on 127.0.0.1, on a fresh free port,
with the scenario's model (``--ttft-ms``, ``--itl-ms``, ``--tokens``):
``python -m refimpl serve --quiet`` (Quart-Trio on hypercorn's trio worker;
quiet, because no peer writes an access line either), with ``--workers N``
a parent and N worker processes sharing one listening socket
(``workers.py``), or a peer script in ``bench/peers/``, each written the
ordinary way for its stack, one process, taking the same command line
(:data:`SERVERS`).  A server counts as up once ``GET /v1/models`` answers
200, and with workers once the parent has printed its welcome, which it
does when every worker serves; it is stopped (SIGTERM, then SIGKILL)
whatever happens.  Its cost is read from the kernel, not from the client's
clock, for the server's whole process tree (:func:`process_tree`): the CPU
time of every thread in ``/proc/PID/task/*/schedstat`` (nanoseconds),
which the client competing for the same cores does not distort, and the
resident memory, ``VmRSS`` and ``VmHWM`` (the peak) in
``/proc/PID/status``, each summed over the processes.

The load.  One httpx client runs N streams at once, each on a connection of
its own, read to the end and parsed with our sans-IO
:class:`~refimpl.sse.SSEParser`; every content token gets a client-side
timestamp when the read that carried it returned.  httpcore's trace hooks
stamp when the TCP connect began and when the request's last byte was
written, so TTFT is counted from that *send* (what the server and the
network added to the model's own ttft), and again from the *connect* (which
also holds a connection that waited in the kernel's accept queue).  A stream
that fails before its response head arrived is a connection set-up failure;
one that ends short, without ``[DONE]`` or with the wrong usage is an error;
both are counted and the run goes on.  ``bench_client.py`` runs this same
load split across several processes.

Everything is bounded: only 127.0.0.1, at most ``streams`` connections, and
a deadline on starting a server, on stopping it and on a whole load run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import trio

from .cli import WELCOME
from .sse import SSEParser

PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers"
#: The servers the bench can measure: name -> its peer script (refimpl: ``python -m refimpl serve``).
SERVERS: dict[str, Path | None] = {
    "refimpl": None,
    "sse-starlette": PEERS / "sse_starlette_server.py",  # FastAPI + sse-starlette on uvicorn
    "starlette": PEERS / "starlette_server.py",  # a plain Starlette StreamingResponse on uvicorn
    "quart-asyncio": PEERS / "quart_asyncio_server.py",  # Quart on hypercorn's asyncio worker
}
BASELINE = "sse-starlette"  # the peer every ratio is taken against (the goals)
HOST = "127.0.0.1"  # the bench never talks to anything else
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Plan:
    """One load: ``streams`` streams at once of ``tokens`` tokens each, from a
    model that waits ``ttft_ms`` before the first and ``itl_ms`` between them."""

    streams: int
    tokens: int
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    timeout: float = 300.0  # seconds the whole load may take
    first: int = 0  # the first stream's number (a process running a share of them)


# -- the server side -----------------------------------------------------------
# region: server-cpu
def cpu_seconds(*pids: int) -> float:
    """CPU time processes have used (all their threads), from the kernel.

    ``/proc/PID/task/TID/schedstat`` counts each thread's time on a CPU in
    nanoseconds; ``/proc/PID/stat`` (utime + stime, fields 14 and 15) only in
    clock ticks of 1/``SC_CLK_TCK`` s, too coarse for a short run, so it is
    the fallback where schedstat is missing.  The command name (field 2) may
    contain spaces, so ``stat`` is split after its closing parenthesis.
    """
    total = 0.0
    for pid in pids:  # one server's process tree: a parent and its workers
        try:
            tasks = Path(f"/proc/{pid}/task").iterdir()
            total += sum(int((t / "schedstat").read_text().split()[0]) for t in tasks) / 1e9
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# endregion: server-cpu


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it, parents first: for
    ``refimpl serve --workers N``, the parent and its N workers.  Each
    process's parent is field 4 of its ``/proc/PID/stat`` (this kernel has no
    ``/proc/PID/task/TID/children``, which needs ``CONFIG_PROC_CHILDREN``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # it exited while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree = [pid]
    for p in tree:  # the list grows as it is walked: breadth first
        tree.extend(sorted(children.get(p, [])))
    return tree


def memory_kib(*pids: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) from ``/proc/PID/status``, summed over ``pids``: the
    resident memory now, and the most it has been since each process started
    (the kernel's "kB" are KiB).  For several processes the sum of their
    peaks is an upper bound of the peak of their sum: each may have peaked
    at another moment (under a load that holds every stream at once, they
    peak together)."""
    rss = hwm = 0
    for pid in pids:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        status = dict(line.split(":", 1) for line in lines)
        rss += int(status["VmRSS"].split()[0])
        hwm += int(status["VmHWM"].split()[0])
    return rss, hwm


def listen_overflows() -> int:
    """Connections the kernel turned away because a listening socket's accept
    queue was full (``TcpExt: ListenOverflows`` in ``/proc/net/netstat``).
    The count is the network namespace's, not one socket's: on a machine
    doing nothing else during the load, it is the server's."""
    head, values = (
        line.split()
        for line in Path("/proc/net/netstat").read_text().splitlines()
        if line.startswith("TcpExt:")
    )
    return int(dict(zip(head, values, strict=True))["ListenOverflows"])


def label(kind: str, workers: int = 1) -> str:
    """A server's name in the table, the JSON and the plots: ``refimpl×2`` is
    ``refimpl serve --workers 2``, ``refimpl`` one process."""
    return kind if workers == 1 else f"{kind}×{workers}"


def server_command(
    kind: str, port: int, plan: Plan, batch_tokens: int = 64, workers: int = 1, backlog: int | None = None
) -> list[str]:
    """The command line; ``workers`` and ``backlog`` (None: its own default) are refimpl's."""
    knobs = ["--host", HOST, "--port", str(port), "--tokens", str(plan.tokens)]
    knobs += ["--ttft-ms", str(plan.ttft_ms), "--itl-ms", str(plan.itl_ms)]
    if kind == "refimpl":
        serve = [sys.executable, "-m", "refimpl", "serve", "--quiet", "--workers", str(workers)]
        serve += [] if backlog is None else ["--backlog", str(backlog)]
        # The peers admit every stream; refimpl's admission control (lesson 09,
        # default 1,024 at once) must not refuse what the bench asks for.
        serve += ["--max-concurrent", str(max(plan.streams, 1024))]
        # Nor its per-address caps (lesson 14): every stream of the load
        # comes from one address, 127.0.0.1, and the peers have no such cap.
        serve += ["--max-streams-per-client", "0", "--max-connections-per-client", "0"]
        return [*serve, *knobs, "--batch-tokens", str(batch_tokens)]
    if not SERVERS[kind].exists():
        raise SystemExit(f"the {kind} peer is not at {SERVERS[kind]} (run from a source checkout)")
    return [sys.executable, str(SERVERS[kind]), *knobs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@asynccontextmanager
async def running_server(
    kind: str,
    plan: Plan,
    *,
    batch_tokens: int = 64,
    fastwrite: bool = True,
    workers: int = 1,
    backlog: int | None = None,
) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start one server, wait until it answers, and always stop it."""
    port = free_port()
    env = {**os.environ, "REFIMPL_FASTWRITE": "1" if fastwrite else "0"}
    with tempfile.TemporaryFile() as log:
        cmd = server_command(kind, port, plan, batch_tokens, workers, backlog)
        proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log, env=env)
        try:
            url = f"http://{HOST}:{port}"
            await wait_until_up(proc, url, log, every_worker=workers > 1)
            yield proc, url
        finally:
            await stop(proc, grace=10)


async def stop(proc: trio.Process, grace: float) -> None:
    """SIGTERM, ``grace`` seconds to drain, then SIGKILL; shielded, since it
    runs in a ``finally`` that a cancellation may have brought us to."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def wait_until_up(proc: trio.Process, url: str, log: Any, every_worker: bool = False) -> None:
    """Until ``GET /v1/models`` answers 200: one worker serves.  With
    ``every_worker``, also until the welcome is in the server's log (read with
    ``pread``, which leaves the offset the server writes at alone): with
    ``--workers N`` the parent prints it once every worker serves
    (``workers.py``, step 2)."""
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.move_on_after(30):
            while proc.returncode is None:
                try:
                    if (await client.get(url + "/v1/models")).status_code == 200 and (
                        not every_worker or WELCOME.encode() in os.pread(log.fileno(), 1 << 16, 0)
                    ):
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
    log.seek(0)
    raise SystemExit(f"{proc.args[:4]} did not come up on {url}:\n{log.read().decode()[-2000:]}")


# -- the client side -----------------------------------------------------------
@dataclass
class Load:
    """What the client saw during one load run (times in seconds)."""

    started: float = 0.0  # time.perf_counter(): one clock for every process on the machine
    ended: float = 0.0
    cpu_s: float = 0.0  # what the client itself spent meanwhile (time.process_time)
    tokens: int = 0
    reads: int = 0  # network reads that delivered bytes (how batched the wire was)
    errors: list[str] = field(default_factory=list)
    setup_failures: int = 0  # streams that failed before their response head arrived
    ttft: list[float] = field(default_factory=list)  # from the request sent
    ttft_from_connect: list[float] = field(default_factory=list)  # from the TCP connect begun
    connect: list[float] = field(default_factory=list)  # how long the TCP connect took
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    @classmethod
    def merge(cls, loads: list[Self]) -> Self:
        """The loads of several processes as one: counts added, samples pooled."""
        out = cls(min(x.started for x in loads), max(x.ended for x in loads))
        for x in loads:
            out.tokens += x.tokens
            out.reads += x.reads
            out.setup_failures += x.setup_failures
            out.cpu_s += x.cpu_s
            for samples in ("errors", "ttft", "ttft_from_connect", "connect", "itl", "e2e"):
                getattr(out, samples).extend(getattr(x, samples))
        return out


def request_body(i: int, plan: Plan) -> dict[str, Any]:
    return {
        "model": "refimpl-sim",
        "messages": [{"role": "user", "content": f"bench stream {i}"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "simulate": {"tokens": plan.tokens, "itl_ms": plan.itl_ms, "ttft_ms": plan.ttft_ms},
    }


# region: bench-stream
async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], load: Load) -> None:
    """Read one whole stream, stamping every content token when it arrived."""
    marks: dict[str, float] = {}

    async def trace(event: str, info: dict[str, Any]) -> None:  # httpcore's hooks, e.g.
        marks.setdefault(event, time.perf_counter())  # "connection.connect_tcp.started"

    start = time.perf_counter()
    stamps: list[float] = []
    parser, head, done, usage, failure = SSEParser(), False, False, None, ""
    try:
        request = {"json": body, "extensions": {"trace": trace}}
        async with client.stream("POST", url + "/v1/chat/completions", **request) as resp:
            head = True
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
        failure = f" ({type(err).__name__}: {err})"
        load.setup_failures += not head  # no response head: the connection never got going
    want = body["simulate"]["tokens"]
    if failure or not done or len(stamps) != want or (usage or {}).get("completion_tokens") != want:
        name = body["messages"][0]["content"]
        load.errors.append(f"{name}: {len(stamps)}/{want} tokens, done={done}{failure}")
    connecting = marks.get("connection.connect_tcp.started", start)
    if "connection.connect_tcp.complete" in marks:
        load.connect.append(marks["connection.connect_tcp.complete"] - connecting)
    if stamps:
        load.ttft.append(stamps[0] - marks.get("http11.send_request_body.complete", start))
        load.ttft_from_connect.append(stamps[0] - connecting)
        load.itl.extend(b - a for a, b in itertools.pairwise(stamps))
        load.e2e.append(time.perf_counter() - start)


# endregion: bench-stream


async def run_load(url: str, plan: Plan, load: Load) -> None:
    limits = httpx.Limits(max_connections=plan.streams, max_keepalive_connections=plan.streams)
    timeout = httpx.Timeout(30, read=60)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        with trio.fail_after(plan.timeout):
            async with trio.open_nursery() as nursery:
                load.started, cpu = time.perf_counter(), time.process_time()
                for i in range(plan.first, plan.first + plan.streams):
                    nursery.start_soon(one_stream, client, url, request_body(i, plan), load)
    load.ended, load.cpu_s = time.perf_counter(), time.process_time() - cpu
