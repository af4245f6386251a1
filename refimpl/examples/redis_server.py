"""A throwaway Redis on a loopback port (issue 13: resumable streams across processes).

Strategy
--------
``refimpl serve --store redis://...`` keeps each resumable stream's log in
Redis (``redis_store.py``), so the tests, the cluster beside this file and a
reader trying it out all need a Redis that is theirs: started on a free
port, empty, gone afterwards, and one they can crash and bring back.  This
module runs ``redis-server`` in the foreground as a child process.  What the
Redis documentation says, and what we rely on:

* Every ``redis.conf`` directive can be given on the command line as
  ``--name value``, and the command line wins over any file.  We pass no
  file, so the built-in defaults hold for the rest.
* ``--save ''`` turns RDB snapshots off and ``--appendonly no`` the
  append-only file: nothing is written to disk, so a restarted server comes
  back *empty*, which is what "Redis restarted mid-stream" means for a
  resume log.  ``--dir`` (where it would write) is still a private
  temporary directory, so a stray snapshot could land nowhere shared.
* ``--bind 127.0.0.1`` listens on loopback only; protected mode (on by
  default) would refuse outside clients anyway.
* ``--daemonize no`` keeps the server in the foreground, our child, so we
  can signal it: SIGTERM is a normal shutdown (it would save first if
  saving were on), SIGKILL is a crash.
* The server answers ``PING`` with ``+PONG`` once it serves, and
  ``INFO server`` reports its ``process_id``.  A Redis that does not bind
  its port logs "Address already in use" and exits 1; another Redis on that
  port would answer our PING all the same, so we call ours ready only when
  the server that answers names *our* child's pid (a real trap: a fixed
  port may already run somebody else's Redis).
* Redis cannot listen on port 0, so, as ``nginx_proxy.py`` does for nginx,
  we ask the kernel for a free port and try again with a fresh one when we
  lose it to another process before Redis binds it.

One implementation, three ways in: :class:`RedisServer` is a context
manager for scripts (``with RedisServer() as redis:``) and an async one for
trio (``async with RedisServer() as redis:``, the blocking start and stop in
a worker thread), and the command line::

    .venv/bin/python -m refimpl.examples.redis_server --port 6390

``redis.url`` is what ``--store`` takes.  ``kill()`` crashes it (SIGKILL);
``restart()`` starts it again, empty, on the same port.  In trio, run the
restart in a thread: ``await trio.to_thread.run_sync(redis.restart)``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from .nginx_proxy import free_loopback_port

DEBIAN_PACKAGE = "redis-server"  # `apt-get install redis-server` gives /usr/bin/redis-server
START_ATTEMPTS = 5  # fresh ports to try when another process took ours
READY_POLLS = 100  # x 50 ms: Redis with nothing to load serves within milliseconds
STOP_WAIT = 5.0  # seconds for Redis to exit after SIGTERM before SIGKILL


class RedisNotFound(RuntimeError):
    pass


def find_redis() -> str:
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if found is None:
        raise RedisNotFound(
            f"redis-server is not installed; on Debian or Ubuntu: apt-get install {DEBIAN_PACKAGE}"
        )
    return found


def server_pid(port: int) -> int | None:
    """The ``process_id`` of the Redis answering on ``port``, or None if none answers.

    Inline commands (a line of words, no RESP framing) are enough here:
    ``PING`` then ``INFO server``, whose bulk reply holds ``process_id:N``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\nINFO server\r\n")
            reply = b""
            while (found := re.search(rb"process_id:(\d+)\r\n", reply)) is None:
                if not (chunk := conn.recv(4096)):
                    return None
                reply += chunk
    except OSError:
        return None
    return int(found[1]) if reply.startswith(b"+PONG\r\n") else None


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` (a free one by default)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port  # after start(): the port it listens on, kept for restart()
        self.errors = ""  # its log, kept after stop()
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> RedisServer:
        """Start Redis and wait until it answers; returns itself."""
        binary = find_redis()
        self._dir = Path(tempfile.mkdtemp(prefix="refimpl-redis-"))
        try:
            for _ in range(START_ATTEMPTS if self.port is None else 1):
                port = self.port or free_loopback_port()
                logged = len(self.read_log())  # judge this attempt's lines only
                if self._run(binary, port):
                    self.port = port
                    return self
                if "Address already in use" not in self.read_log()[logged:]:
                    break  # a real error, not a lost race for the port
            raise RuntimeError(f"redis-server did not start:\n{self.read_log()}")
        except BaseException:
            self.stop()
            raise

    def restart(self) -> RedisServer:
        """Start again on the same port, empty (after ``kill()``, or crash it first)."""
        if self._dir is None:
            raise RuntimeError("restart() is for a server that was started (and not stopped)")
        self.kill()
        if not self._run(find_redis(), self.port):
            raise RuntimeError(f"redis-server did not restart on {self.port}:\n{self.read_log()}")
        return self

    def _run(self, binary: str, port: int) -> bool:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--loglevel", "warning", "--dir", str(self._dir)]
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it.
        with (self._dir / "redis.log").open("ab") as log:  # Redis logs to stdout by default
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        for _ in range(READY_POLLS):  # bounded: Redis either serves or exits
            if self._proc.poll() is not None:
                return False  # the port was taken, or a bad argument
            if server_pid(port) == self._proc.pid:
                return True
            time.sleep(0.05)
        self.kill()
        return False

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown; the port is free when this returns."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def stop(self) -> None:
        """A normal shutdown (SIGTERM, SIGKILL after STOP_WAIT s); keep the log in ``errors``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):  # then kill(), below
                self._proc.wait(STOP_WAIT)
        self.kill()
        if self._dir is not None:
            self.errors = self.read_log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def read_log(self) -> str:
        log = self._dir / "redis.log" if self._dir else None
        return log.read_text(errors="replace") if log and log.exists() else self.errors

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> RedisServer:
        return await trio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):  # bounded: STOP_WAIT, then SIGKILL
            await trio.to_thread.run_sync(self.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m refimpl.examples.redis_server",
        description="Run a throwaway redis-server on 127.0.0.1 (no persistence) until Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=6390, help="the port (0: any free one)")
    args = parser.parse_args(argv)
    # As in nginx_proxy.main: Ctrl-C and `kill` both end the `with`, which
    # stops Redis (in its own session, it gets neither signal).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    with RedisServer(args.port or None) as redis:
        print(f"redis: {redis.url}  (pid {redis.pid}; --store {redis.url}; Ctrl-C to stop)", flush=True)
        try:
            while redis.running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            return
    raise SystemExit(f"redis-server exited on its own:\n{redis.errors}")


if __name__ == "__main__":
    main()
