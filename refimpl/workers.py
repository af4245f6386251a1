"""``refimpl serve --workers N``: N server processes behind one listening socket.

Strategy
--------
One trio process uses at most one CPU core, and past that its streams slow
each other down (DESIGN §4 measures the cost per token).  More cores need
more processes, and there are two ways for them to share a port:

* **SO_REUSEPORT**: every process binds a socket of its own to the same port
  and the kernel hashes each new connection to one of them.  But with
  ``--port 0`` each would get a different port; a second server started on
  the port by mistake joins in silently instead of failing "already in use";
  a connection hashed to a busy process waits while another sits idle; and
  the connections queued on a process that dies are reset with it.
* **One socket, bound once**, which we use: the parent binds and listens
  (with hypercorn's own ``Config.create_sockets``, the socket one process
  would make), and each child serves that inherited descriptor through
  hypercorn's ``fd://N`` bind.  All of them accept from one queue, so a free
  worker takes the next connection, and the real port is known once, before
  any child starts.  hypercorn's own ``--workers`` (``hypercorn/run.py``)
  does the same; we do not call it because it loads the app from an import
  path and stops its workers through a ``multiprocessing.Event`` they poll,
  without our drain.  Each child here is ``refimpl serve`` itself, started
  again with the same arguments plus ``--listen-fd N``, so it runs the very
  code one process runs (``cli.run_server``: drain, access log).

The parent, step by step (POSIX only: ``pass_fds``, process groups):

1. Start the children in a process group of their own, so that Ctrl-C in a
   terminal reaches only the parent, which forwards each SIGINT/SIGTERM to
   every child: the first starts each child's drain, the second stops each
   at once, the same two steps as one process (``patterns/shutdown.py``).
2. Print the welcome once every child has written its ready line (its stdout
   is a pipe to the parent), so a client that connects then finds every
   worker accepting.  A signal that arrives before that is held until then.
3. Wait for all of them; exit 0 if all exited 0.  A child that exits before
   it was asked to (a crash, the OOM killer) is reported on stderr, the
   others are drained, and the parent exits 1.  It is not restarted: a
   reference server fails loudly and leaves restarts to systemd or
   Kubernetes, which restart the whole server.

A child's stdin is a pipe from the parent that nobody writes: it ends when
the parent is gone, even after ``kill -9``, and the child then drains and
exits instead of keeping the port.

What each worker keeps to itself
--------------------------------
Every worker is a whole server with its own engine: its own generations and
traces, its own ``/metrics``, its own admission queue (``--max-concurrent``
and ``--max-queue`` count per worker).  So ``GET /v1/debug/generations/{id}``
answers only on the worker that ran that generation; a new connection may
land on another one and get a 404.  Every HTTP response names its worker in
``X-Refimpl-Worker: <pid>``, and the access log lines carry the same pid.
``/metrics`` shows the one worker that answered the scrape.  Resuming a
stream on another worker needs a store they share (the "Resumable streams"
issue: Redis Streams), which is not built yet.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import trio

from .app import hypercorn_config
from .config import Config

#: What a child writes to its stdout when it serves: this, then its URL.
READY = "worker ready on "


def serve_workers(config: Config, workers: int, argv: list[str], welcome: Callable[[str], None]) -> int:
    """Bind once, run ``workers`` children of ``refimpl <argv>``; the exit code."""
    hc = hypercorn_config(config.host, config.port, config.backlog)
    sock = hc.create_sockets().insecure_sockets[0]
    sock.listen(config.backlog)  # connections queue from now on, until a child accepts them
    child = [sys.executable, "-m", "refimpl", *argv, "--workers", "1", "--listen-fd", str(sock.fileno())]
    return trio.run(_Parent(child, sock.fileno(), workers, welcome).run, sock)


class _Parent:
    """The three steps of the strategy above, for one run of ``refimpl serve --workers N``."""

    def __init__(self, child: list[str], fd: int, workers: int, welcome: Callable[[str], None]) -> None:
        self.child, self.fd, self.workers, self.welcome = child, fd, workers, welcome
        self.procs: list[trio.Process] = []
        self.stopping = False  # a signal was forwarded, or a child died: exits are expected now
        self.failed = False  # some child died unasked, or exited with an error

    async def run(self, sock: socket.socket) -> int:
        # Opened before the children start: from here on, SIGINT is ours to
        # forward, not a KeyboardInterrupt in the parent.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            for _ in range(self.workers):
                self.procs.append(
                    await trio.lowlevel.open_process(
                        self.child,
                        stdin=subprocess.PIPE,  # never written: its end tells the child we are gone
                        stdout=subprocess.PIPE,  # the ready line
                        pass_fds=(self.fd,),
                        process_group=0,  # Ctrl-C reaches the parent only (step 1)
                    )
                )
            sock.close()  # the children hold the listening socket now
            async with trio.open_nursery() as forwarding:
                async with trio.open_nursery() as watching:
                    for proc in self.procs:
                        watching.start_soon(self._watch, proc)
                    urls = [await _ready_url(proc) for proc in self.procs]
                    if not self.stopping and None not in urls:
                        self.welcome(urls[0])
                        forwarding.start_soon(self._forward, signals)
                forwarding.cancel_scope.cancel()  # every child has exited
        return 1 if self.failed else 0

    async def _forward(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.stopping = True
            self._signal_all(signum)

    async def _watch(self, proc: trio.Process) -> None:
        code = await proc.wait()
        if not self.stopping:
            self.stopping = self.failed = True
            _say(f"worker {proc.pid} {_ended(code)} before it was asked to stop; stopping the others, exit 1")
            self._signal_all(signal.SIGTERM)  # a drain, as for a signal
        elif code != 0:
            self.failed = True
            _say(f"worker {proc.pid} {_ended(code)}")

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signum)


async def _ready_url(proc: trio.Process) -> str | None:
    """The URL in a child's ready line, or None if it exited first."""
    line = b""
    while not line.endswith(b"\n"):
        if not (chunk := await proc.stdout.receive_some(1)):  # one byte: stop at the line's end
            return None
        line += chunk
    return line.decode().removeprefix(READY).strip()


def _ended(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _say(message: str) -> None:
    print(f"refimpl: {message}", file=sys.stderr, flush=True)


# The two things a child does differently from a lone server (cli.run_server).


def announce_ready(url: str) -> None:
    """Tell the parent this worker serves (step 2)."""
    print(READY + url, flush=True)


async def stop_when_parent_exits(stop: trio.Event) -> None:
    """Set ``stop`` (start the drain) when the parent is gone: stdin ends."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass  # the parent writes nothing; only the end matters
    logging.getLogger("refimpl").warning("the parent process is gone: draining")
    stop.set()
