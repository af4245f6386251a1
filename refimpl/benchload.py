"""The apparatus of ``refimpl bench``: the servers it measures, and the load.

Strategy
--------
``bench.py`` decides *what* to measure and reports it; this module holds the
two instruments it measures with (lesson 13, "What is measured, and where").

The servers.  Each runs as a subprocess on 127.0.0.1, on a fresh free port:
``python -m refimpl serve`` (Quart-Trio on hypercorn's trio worker), or the
peer ``bench/peers/sse_starlette_server.py`` (FastAPI + sse-starlette on
uvicorn), both with a model that takes no time (``--ttft-ms 0``).  A server
counts as up once ``GET /v1/models`` answers 200, and it is stopped (SIGTERM,
then SIGKILL) whatever happens.  Its cost is read from the kernel, not from
the client's clock: the CPU time of its threads in
``/proc/PID/task/*/schedstat`` (nanoseconds), which the client competing for
the same cores does not distort.

The load.  This process is the client: one httpx client, N streams, each read
to the end and parsed with our sans-IO :class:`~refimpl.sse.SSEParser`; every
content token gets a client-side timestamp when the read that carried it
returned, from which come TTFT, ITL and end-to-end latency.  A stream that
ends short, without ``[DONE]`` or with the wrong usage is recorded as an
error, and the run goes on.

Everything is bounded: only 127.0.0.1, at most ``--streams`` connections, and
a deadline on starting a server, on stopping it and on a whole load run.
"""

from __future__ import annotations

import argparse
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
from typing import Any

import httpx
import trio

from .sse import SSEParser

SERVERS = ("refimpl", "peer")
PEER = Path(__file__).resolve().parent.parent / "bench" / "peers" / "sse_starlette_server.py"
HOST = "127.0.0.1"  # the bench never talks to anything else
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    knobs = [
        "--host",
        HOST,
        "--port",
        str(port),
        "--itl-ms",
        str(itl_ms),
        "--ttft-ms",
        "0",
        "--tokens",
        str(tokens),
    ]
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
        load.errors.append(
            f"stream {body['messages'][0]['content']}: {len(stamps)}/{want} tokens, done={done}"
        )
    if stamps:
        load.ttft.append(stamps[0] - start)
        load.itl.extend(b - a for a, b in itertools.pairwise(stamps))
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
                    nursery.start_soon(
                        one_stream, client, url, request_body(i, args.tokens, args.itl_ms), load
                    )
