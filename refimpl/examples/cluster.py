"""Two (or N) refimpl processes behind nginx, sharing one Redis (issue 13, lesson 11).

Strategy
--------
A resumable stream is only worth the name when the resume can land on a
different process from the one generating: that process may be busy, or
dead.  ``refimpl serve --workers N`` cannot show it (its workers share one
socket, and the kernel, not a proxy, picks), so this module builds the
deployment the lesson describes: a Redis (``redis_server.py``), N separate
``refimpl serve --store <redis>`` processes, each on a port of its own, and
a real nginx in front (``cluster.nginx.conf`` beside this file) that deals
requests out in turn.  What nginx's documentation says, and what we rely on:

* An ``upstream`` block with several ``server`` lines and no balancing
  method is round-robin: consecutive requests go to consecutive servers.
* ``proxy_next_upstream error timeout`` passes a request on to the next
  server when one cannot be connected to or does not answer in time; a POST
  is passed on only if none of it was sent yet, which is the case for a
  worker that is gone (its port refuses the connection).  A server that
  failed is skipped for ``fail_timeout`` (10 s by default).
* The rest (``proxy_http_version 1.1``, ``proxy_read_timeout``,
  ``X-Accel-Buffering``, running nginx in the foreground from a private
  prefix, retrying on a lost port) is lesson 08's proxy, which we reuse:
  :class:`UpstreamGroup` is ``nginx_proxy.NginxProxy`` with this config.

Each worker is started with ``--port 0`` and is ready when its welcome line
(``cli.WELCOME`` + URL) is in its log and ``GET /v1/models`` answers.  It
runs in a session of its own, so Ctrl-C reaches only us and we stop
everything in order (SIGTERM, the server's drain; SIGKILL if it lingers),
and ``worker.kill()`` is a crash (SIGKILL) that nothing else notices until
a request finds the port closed.  Every response names its process in
``X-Refimpl-Worker``, the ``pid`` of one of :attr:`Cluster.workers`.

Three ways in: ``with Cluster(workers=2) as cluster:``, ``async with
Cluster(workers=2) as cluster:`` (trio; start and stop in a worker thread),
and the command line (``make cluster``); any flag it does not know goes to
every ``refimpl serve``::

    .venv/bin/python -m refimpl.examples.cluster --port 8080 --workers 2 --redis-port 6390
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

from ..cli import WELCOME
from .nginx_proxy import NginxProxy, free_loopback_port
from .redis_server import RedisServer

TEMPLATE = Path(__file__).with_name("cluster.nginx.conf")
READY_WAIT = 30.0  # seconds for a worker to import, start and answer
STOP_WAIT = 5.0  # seconds for a worker to drain after SIGTERM before SIGKILL


class UpstreamGroup(NginxProxy):
    """nginx round-robin over ``upstreams`` (``http://host:port`` URLs)."""

    def __init__(self, upstreams: Sequence[str], **settings: object) -> None:
        super().__init__(upstreams[0], **settings)
        self.upstreams = list(upstreams)

    def config(self, port: int, h2c_port: int) -> str:
        servers = "".join(f"        server {url.removeprefix('http://')};\n" for url in self.upstreams)
        values = {
            "port": str(port),
            "h2c_port": str(h2c_port),
            "servers": servers.rstrip("\n"),
            "read_timeout": f"{round(self.settings['read_timeout'] * 1000)}ms",
        }
        text = TEMPLATE.read_text()
        for name, value in values.items():
            text = text.replace("{{" + name + "}}", value)
        assert "{{" not in text, "cluster.nginx.conf has a placeholder we do not fill"
        return text


class Worker:
    """One ``refimpl serve`` process; ``url`` is set once it serves."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log, self.url = log, ""
        with log.open("ab") as out:  # its stdout (the welcome) and stderr (the access log)
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WAIT
        while time.monotonic() < deadline:  # bounded: it serves, exits, or we give up
            if self.proc.poll() is not None:
                break
            if not self.url:
                welcome = [line for line in self.output().splitlines() if line.startswith(WELCOME)]
                self.url = welcome[0].removeprefix(WELCOME).split()[0] if welcome else ""
            if self.url and self.answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"refimpl serve (pid {self.pid}) did not start:\n{self.output()}")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """A crash: SIGKILL, no drain; its port refuses connections when this returns."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """Redis, ``workers`` refimpl processes and nginx; ``url`` is nginx's, once started.

    Pass ``redis`` to share a running :class:`RedisServer` (it is then left
    running), or ``redis_port`` to choose the port of the one we start."""

    def __init__(
        self,
        workers: int = 2,
        *,
        port: int | None = None,
        h2c_port: int | None = None,
        redis: RedisServer | None = None,
        redis_port: int | None = None,
        serve_args: Sequence[str] = (),
        read_timeout: float = 60.0,
    ) -> None:
        self.size, self.serve_args = workers, list(serve_args)
        self.own_redis = redis is None
        self.redis = redis or RedisServer(redis_port)
        self.proxy_settings = dict(port=port, h2c_port=h2c_port, read_timeout=read_timeout)
        self.proxy: UpstreamGroup | None = None
        self.workers: list[Worker] = []
        self.url = ""
        self._dir: Path | None = None

    @property
    def h2c_url(self) -> str:
        return self.proxy.h2c_url if self.proxy else ""

    def start(self) -> Cluster:
        try:
            if self.own_redis:
                self.redis.start()
            self._dir = Path(tempfile.mkdtemp(prefix="refimpl-cluster-"))
            serve = [sys.executable, "-m", "refimpl", "serve", "--port", "0", "--store", self.redis.url]
            # Behind nginx every client has nginx's address: the per-address
            # caps (lesson 14) would count all of them as one client.
            serve += ["--max-streams-per-client", "0", "--max-connections-per-client", "0"]
            for i in range(self.size):  # all start at once, then we wait for each
                self.workers.append(Worker([*serve, *self.serve_args], self._dir / f"worker-{i + 1}.log"))
            for worker in self.workers:
                worker.wait_ready()
            self.proxy = UpstreamGroup([w.url for w in self.workers], **self.proxy_settings)
            self.url = self.proxy.start()
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """nginx, then every worker (a drain, all at once), then our Redis."""
        if self.proxy is not None:
            self.proxy.stop()
        for worker in self.workers:
            if worker.alive():
                worker.proc.terminate()
        deadline = time.monotonic() + STOP_WAIT
        for worker in self.workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
        if self.own_redis:
            self.redis.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Cluster:
        return await trio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):  # bounded: STOP_WAIT per kind of process
            await trio.to_thread.run_sync(self.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m refimpl.examples.cluster",
        description="Run Redis, N `refimpl serve --store` processes and nginx in front until Ctrl-C;"
        " other flags go to every `refimpl serve`.",
        allow_abbrev=False,  # an abbreviation of a serve flag must not match one of ours
    )
    parser.add_argument("--port", type=int, default=8080, help="nginx's HTTP/1.1 port (0: any free one)")
    parser.add_argument("--h2c-port", type=int, default=8081, help="nginx's HTTP/2 port (0: any free one)")
    parser.add_argument("--workers", type=int, default=2, help="refimpl serve processes")
    parser.add_argument("--redis-port", type=int, default=6390, help="Redis's port (0: any free one)")
    parser.add_argument("--read-timeout", type=float, default=60.0, help="proxy_read_timeout, seconds")
    parser.add_argument("--print-config", action="store_true", help="print nginx's config and exit")
    args, serve_args = parser.parse_known_args(argv)
    if args.print_config:  # for two workers on made-up ports
        port = args.port or free_loopback_port()
        group = UpstreamGroup(
            ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], read_timeout=args.read_timeout
        )
        print(group.config(port, args.h2c_port or free_loopback_port(port)), end="")
        return
    cluster = Cluster(
        args.workers,
        port=args.port or None,
        h2c_port=args.h2c_port or None,
        redis_port=args.redis_port or None,
        serve_args=serve_args,
        read_timeout=args.read_timeout,
    )
    # As in nginx_proxy.main: Ctrl-C and `kill` both end the `with`, which
    # stops everything in order (in their own sessions, they get neither).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        with cluster:
            print(f"cluster: {cluster.url}  (h2c: {cluster.h2c_url}; Ctrl-C to stop)", flush=True)
            for i, worker in enumerate(cluster.workers, 1):
                print(f"  worker {i}  : {worker.url}  (pid {worker.pid}; kill -9 {worker.pid} to crash it)")
            print(f"  redis     : {cluster.redis.url}  (pid {cluster.redis.pid})", flush=True)
            dead: set[int] = set()
            while cluster.proxy.running():
                for worker in cluster.workers:
                    if not worker.alive() and worker.pid not in dead:
                        dead.add(worker.pid)  # the demo goes on: nginx sends its share to the others
                        print(f"  worker {worker.pid} exited ({worker.proc.returncode})", flush=True)
                time.sleep(0.5)
    except KeyboardInterrupt:
        return
    raise SystemExit(f"nginx exited on its own:\n{cluster.proxy.errors}")


if __name__ == "__main__":
    main()
