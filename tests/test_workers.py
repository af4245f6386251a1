"""``refimpl serve --workers N`` and ``--backlog N`` (``workers.py``; issue 11).

Every test runs the real command and talks to it over real sockets.  Which
process served a response is read from its ``X-Refimpl-Worker`` header (the
worker's pid); that a pid is a child of the server is read from ``/proc``;
the backlog of the listening socket is read back with ``ss`` (its Send-Q
column, for a listening socket, is the backlog the kernel applies).  Nothing
sleeps to synchronise: the welcome line, the streams' own events, the
workers' log lines, and the end of the stderr pipe (every process that
shares it has exited) say when.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from conftest import chat_body
from test_cli import start_serve
from test_shutdown import read_all

from refimpl.config import Config
from refimpl.model import simulated_text
from refimpl.sse import SSEParser
from refimpl.workers import READY

URL = "/v1/chat/completions"
FOREVER = {"ttft_ms": 600_000}  # still running when the drain times out
SHORT = {"ttft_ms": 0, "itl_ms": 50, "tokens": 3}  # finishes during the drain, or is ended by it


def fresh_connections() -> httpx.AsyncClient:
    """A client that opens a new connection per request: each one is accepted
    by whichever worker gets there first, not by the one that served the last."""
    return httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0))


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid


async def stop(proc: trio.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    with trio.fail_after(30):
        return await proc.wait()


async def test_two_workers_share_one_port_and_both_serve_streams():
    proc, url = await start_serve("--workers", "2", "--quiet")
    served: dict[str, int] = {}  # prompt -> the worker's pid
    try:
        async with fresh_connections() as client:

            async def stream(prompt: str) -> None:
                body = chat_body(prompt, stream=True, simulate={"tokens": 40, "itl_ms": 1})
                parser, events = SSEParser(), []
                async with client.stream("POST", url + URL, json=body) as resp:
                    async for raw in resp.aiter_raw():
                        events += parser.feed(raw)
                assert events[-1].data == "[DONE]"
                chunks = [json.loads(e.data) for e in events[:-1]]
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                assert text == "".join(simulated_text(prompt, 0)[:40])
                served[prompt] = int(resp.headers["x-refimpl-worker"])

            # Which worker accepts a connection is the kernel's choice: run
            # rounds of concurrent streams until both have served (a bound,
            # not a wait: one round nearly always does it).
            for round in range(10):
                async with trio.open_nursery() as nursery:
                    for i in range(24):
                        nursery.start_soon(stream, f"round {round} stream {i}")
                if len(set(served.values())) == 2:
                    break
        workers = set(served.values())
        assert len(workers) == 2, f"one worker served all {len(served)} streams"
        assert all(parent_of(pid) == proc.pid for pid in workers)  # the server's children
    finally:
        code = await stop(proc)
    assert code == 0
    # The rest of the welcome (start_serve read its first line), once, and
    # none of the children's ready lines: those went to the parent alone.
    rest = await read_all(proc.stdout)
    assert rest.count(f"  metrics   : {url}/metrics") == 1
    assert "streaming on" not in rest and READY not in rest


class Stderr:
    """A process's stderr as it arrives, to wait for a line the server logs."""

    def __init__(self) -> None:
        self.text = b""
        self._grew = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some():
            self.text += chunk
            self._grew.set()
            self._grew = trio.Event()

    async def wait_for(self, line: str) -> None:
        while line.encode() not in self.text:
            await self._grew.wait()


@pytest.mark.parametrize("signals", [1, 2])
async def test_sigterm_drains_every_worker_and_a_second_stops_them(signals):
    """Streams in flight on both workers when the parent gets SIGTERM: each
    ends with [DONE] or the server_shutdown error event, never a cut body,
    both workers log their drain, and the parent exits 0.  A second SIGTERM
    during the drain (600 s here) reaches both workers and stops them at
    once, cutting the streams, as it does one process (test_shutdown.py)."""
    drain = "1" if signals == 1 else "600"
    proc, url = await start_serve("--workers", "2", "--drain-timeout", drain, stderr=subprocess.PIPE)
    ends: list[tuple[str, int, str]] = []  # (kind, worker pid, how the stream ended)
    stderr = Stderr()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stderr.read, proc.stderr)
            async with fresh_connections() as client:

                async def stream(kind: str, simulate: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    parser, events = SSEParser(), []
                    body = chat_body(stream=True, simulate=simulate)
                    async with client.stream("POST", url + URL, json=body) as resp:
                        pid = int(resp.headers["x-refimpl-worker"])
                        try:
                            async for raw in resp.aiter_raw():
                                events += parser.feed(raw)
                                if events and task_status is not None:  # the role chunk: live
                                    task_status.started(pid)
                                    task_status = None  # started once
                        except httpx.RemoteProtocolError:
                            ends.append((kind, pid, "cut"))
                            return
                    last = events[-1]
                    if last.data == "[DONE]":
                        ending = "[DONE]"
                    elif last.type == "error":
                        ending = json.loads(last.data)["error"]["code"]
                    else:
                        ending = f"no ending after {last.data}"
                    ends.append((kind, pid, ending))

                async with trio.open_nursery() as streams:
                    busy: set[int] = set()
                    for _ in range(40):  # until a stream runs on each worker
                        busy.add(await streams.start(stream, "long", FOREVER))
                        if len(busy) == 2:
                            break
                    assert len(busy) == 2, "every stream landed on one worker"
                    for _ in range(4):
                        await streams.start(stream, "short", SHORT)
                    proc.send_signal(signal.SIGTERM)
                    if signals == 2:
                        # Both workers have handled the first (a signal that
                        # arrives before that merges into it), then the second.
                        with trio.fail_after(30):
                            for pid in busy:
                                await stderr.wait_for(f"[{pid}] INFO draining: waiting up to 600 s")
                        proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert code == 0
    assert {pid for _, pid, _ in ends} == busy
    err = stderr.text.decode()
    if signals == 1:  # told, not cut
        for kind, _, ending in ends:
            if kind == "long":
                assert ending == "server_shutdown"
            else:  # finished during the drain, or (on a slow machine) ended by it
                assert ending in ("[DONE]", "server_shutdown")
        for pid in busy:
            assert f"[{pid}] INFO draining: waiting up to 1 s" in err
    else:  # stopped at once: cut, which is what a second signal asks for
        assert all(ending == "cut" for kind, _, ending in ends if kind == "long")
        for pid in busy:
            assert f"[{pid}] WARNING second signal: stopping now" in err
    assert "Traceback" not in err


async def test_a_killed_worker_stops_the_server_with_exit_1():
    proc, url = await start_serve("--workers", "2", "--quiet", stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient() as client:
            victim = int((await client.get(url + "/v1/models")).headers["x-refimpl-worker"])
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(30):
            code = await proc.wait()
            err = await read_all(proc.stderr)  # its end: the other worker has exited too
    finally:
        if proc.returncode is None:
            proc.kill()
    assert code == 1
    assert f"refimpl: worker {victim} was killed by SIGKILL before it was asked to stop" in err
    assert "Traceback" not in err


async def test_workers_drain_and_exit_when_the_parent_is_killed():
    """``kill -9`` of the parent leaves no worker holding the port."""
    proc, url = await start_serve("--workers", "2", "--quiet", stderr=subprocess.PIPE)
    proc.kill()
    await proc.wait()
    with trio.fail_after(30):
        err = await read_all(proc.stderr)  # ends when the last worker has exited
    assert err.count("WARNING the parent process is gone: draining") == 2
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(url + "/v1/models")


async def test_a_taken_port_is_still_an_error_with_workers():
    """The parent binds once, without SO_REUSEPORT: a second server on the
    same port fails as it does with one process, instead of joining in."""
    with socket.socket() as taken:
        # SO_REUSEPORT, as a server that shares its port that way sets it: a
        # bind that set it too would succeed and split the connections.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "refimpl", "serve", "--port", str(port), "--workers", "2"]
        result = await trio.run_process(cmd, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use".encode() in result.stderr
    assert b"Traceback" not in result.stderr


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.parametrize(
    ("flags", "backlog"),
    [((), Config.backlog), (("--backlog", "77"), 77), (("--backlog", "77", "--workers", "2"), 77)],
)
async def test_backlog_reaches_the_listening_socket(flags, backlog):
    proc, url = await start_serve(*flags, "--quiet")
    try:
        port = url.rsplit(":", 1)[1]
        ss = await trio.run_process(["ss", "-Hltn", f"sport = :{port}"], capture_stdout=True)
        [listening] = ss.stdout.decode().splitlines()
        state, _recv_q, send_q, *_ = listening.split()
        assert (state, int(send_q)) == ("LISTEN", min(backlog, somaxconn()))
        async with httpx.AsyncClient() as client:
            pid = int((await client.get(url + "/v1/models")).headers["x-refimpl-worker"])
        # --workers 1 (the default) is one process, no parent: the server itself answers.
        assert (pid == proc.pid) == ("--workers" not in flags)
    finally:
        assert await stop(proc) == 0
