"""A real nginx in front of a refimpl server, on loopback ports (lessons 08 and 12).

Strategy
--------
Heartbeats and buffering headers exist because of proxies, so lesson 08 puts
a real one between client and server instead of describing it.  This module
renders ``nginx.conf`` (the file beside it, the config a reader would copy)
and runs nginx in the foreground as a child process.  What the nginx
documentation says, and what we rely on:

* ``proxy_read_timeout`` (default 60 s) bounds the silence *between two
  reads* from the upstream, not the whole response; when it passes nginx
  closes the connection.  A stream that stays quiet longer is cut.
* ``proxy_buffering`` (default on) makes nginx collect the upstream response
  in its buffers; an upstream can turn it off for one response by sending
  ``X-Accel-Buffering: no``, unless ``proxy_ignore_headers`` names that header.
* ``gzip`` compresses only the types listed in ``gzip_types`` (``text/html``
  always), for clients that send ``Accept-Encoding: gzip``.
* ``proxy_http_version`` defaults to 1.0 towards the upstream; 1.1 is needed
  for chunked bodies and kept-alive upstream connections (and, measured, for
  hypercorn to end a stream at all: see ``nginx.conf``).
* ``grpc_pass`` proxies over HTTP/2 to the upstream, and needs HTTP/2 from
  the client, which on a port without TLS means ``listen ... http2``.  On
  nginx 1.22 such a port speaks nothing else (1.25.1 and later can serve
  HTTP/1.1 on it too), so the config listens on two ports: ``port`` for
  HTTP/1.1 and ``h2c_port`` for HTTP/2 (gRPC, and SSE over HTTP/2).
* ``-p PREFIX`` makes every relative path in the config relative to PREFIX,
  ``-e`` sets the error log nginx uses before it has read its config, and
  ``-g`` adds directives from the command line (``daemon off;`` keeps the
  master in the foreground, our child, so we can stop it).
* A master process that runs as root starts its workers as ``user``
  (default ``nobody``).  We then pass ``user root;``: the workers must write
  request bodies over ~16 KiB into ``client_body_temp_path`` inside our
  private temporary prefix (mode 0700, perhaps under a ``$TMPDIR`` nobody
  cannot enter), and a throwaway proxy on 127.0.0.1 gains nothing from
  dropping privileges.  A production nginx keeps its default and its temp
  paths under ``/var/lib/nginx``.  ``tests/test_nginx.py`` sends such a body.
* nginx cannot listen on port 0.  We ask the kernel for free ports (bind
  ``127.0.0.1:0``, read the port, close), and if another process takes one
  before nginx does, nginx reports "Address already in use" and we try again
  with fresh ports.  nginx writes its pid file only after it has bound every
  listening socket, so "the pid file exists and the ports accept a
  connection" means *our* nginx is ready.

One implementation, three ways in: :class:`NginxProxy` is a context manager
for scripts and notebooks (``with NginxProxy(url) as proxy_url:``) and an
async one for trio (``async with nginx_in_front(url) as proxy_url:``, which
runs the blocking start and stop in a worker thread), and the command line::

    .venv/bin/python -m refimpl.examples.nginx_proxy --upstream http://127.0.0.1:8000 \\
        --port 8080 --h2c-port 8081 --read-timeout 2

Each gives the HTTP/1.1 URL; the HTTP/2 one is the proxy's ``h2c_url`` (a
grpcio client's target is that URL without ``http://``).

What reached the client through the proxy, and when, is recorded by
:func:`refimpl.figures.record` (pass it the proxy's URL), which is how
lesson 08 plots a stream with and without heartbeats behind nginx.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

TEMPLATE = Path(__file__).with_name("nginx.conf")
DEBIAN_PACKAGE = "nginx"  # `apt-get install nginx` gives /usr/sbin/nginx
START_ATTEMPTS = 5  # fresh ports to try when another process took ours
READY_POLLS = 100  # x 50 ms: nginx itself retries a busy port for 2.5 s
STOP_WAIT = 5.0  # seconds for nginx to exit after SIGTERM before SIGKILL


class NginxNotFound(RuntimeError):
    pass


def find_nginx() -> str:
    """The nginx binary: on PATH, or Debian's /usr/sbin (not on a user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        raise NginxNotFound(
            f"nginx is not installed (looked on PATH and in /usr/sbin); "
            f"on Debian or Ubuntu: apt-get install {DEBIAN_PACKAGE}"
        )
    return found


def render_config(
    *,
    port: int,
    h2c_port: int,
    upstream: str,
    read_timeout: float,
    gzip: bool,
    honour_accel_buffering: bool,
) -> str:
    """``nginx.conf`` with its ``{{placeholders}}`` filled in."""
    ms = round(read_timeout * 1000)
    values = {
        "port": str(port),
        "h2c_port": str(h2c_port),
        "upstream": urlsplit(upstream).netloc,  # proxy_pass and grpc_pass want host:port
        # nginx's time syntax: "2s", or "1500ms" for a fraction of a second
        "read_timeout": f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms",
        "gzip": "on" if gzip else "off",
        # a line switch: "# " comments the directive out, nginx's default
        "ignore_accel_buffering": "# " if honour_accel_buffering else "",
    }
    template = TEMPLATE.read_text()
    used = set(re.findall(r"\{\{(\w+)\}\}", template))
    assert used == set(values), f"nginx.conf placeholders {used} != {set(values)}"
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m[1]], template)


def free_loopback_port(*besides: int | None) -> int:
    """A port nobody listens on right now (it may be taken before we use it),
    other than ``besides`` (the kernel may hand out a port it just gave us)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in besides:
            return port


class NginxProxy:
    """nginx on ``127.0.0.1:port`` (HTTP/1.1) and ``127.0.0.1:h2c_port``
    (HTTP/2 without TLS: gRPC, and SSE over HTTP/2), free ones by default, in
    front of ``upstream``.  ``url`` and ``h2c_url`` say where, once started."""

    def __init__(
        self,
        upstream: str,
        *,
        port: int | None = None,
        h2c_port: int | None = None,
        read_timeout: float = 60.0,
        gzip: bool = False,
        honour_accel_buffering: bool = True,
    ) -> None:
        if urlsplit(upstream).scheme != "http":
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream = upstream
        self.settings = dict(
            read_timeout=read_timeout, gzip=gzip, honour_accel_buffering=honour_accel_buffering
        )
        self.port, self.h2c_port = port, h2c_port
        self.url = self.h2c_url = ""
        self.errors = ""  # nginx's error log, kept after stop()
        self._proc: subprocess.Popen | None = None
        self._prefix: Path | None = None

    def config(self, port: int, h2c_port: int) -> str:
        return render_config(port=port, h2c_port=h2c_port, upstream=self.upstream, **self.settings)

    def start(self) -> str:
        """Start nginx and wait until it accepts connections; returns its
        HTTP/1.1 URL (the HTTP/2 one is ``h2c_url``)."""
        nginx = find_nginx()
        self._prefix = Path(tempfile.mkdtemp(prefix="refimpl-nginx-"))
        try:
            for _ in range(START_ATTEMPTS if None in (self.port, self.h2c_port) else 1):
                port = self.port or free_loopback_port(self.h2c_port)
                h2c_port = self.h2c_port or free_loopback_port(port)
                (self._prefix / "nginx.conf").write_text(self.config(port, h2c_port))
                logged = len(self.read_errors())  # judge this attempt's lines only
                self._launch(nginx)
                if self._wait_ready(port, h2c_port):
                    self.url, self.h2c_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{h2c_port}"
                    return self.url
                self._end_process()  # (it has normally exited already)
                if "Address already in use" not in self.read_errors()[logged:]:
                    break  # a real error, not a lost race for the port
            raise RuntimeError(f"nginx did not start:\n{self.read_errors()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, nginx: str) -> None:
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        args = [nginx, "-p", str(self._prefix), "-c", "nginx.conf", "-e", "stderr", "-g", directives]
        # Its own session: a Ctrl-C in the terminal reaches only us, and we
        # stop nginx in order; on SIGKILL we kill its whole process group.
        with (self._prefix / "errors.log").open("ab") as errors:  # nginx's stderr
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stderr=errors, start_new_session=True
            )

    def _wait_ready(self, *ports: int) -> bool:
        pid_file = self._prefix / "nginx.pid"
        for _ in range(READY_POLLS):  # bounded: nginx either starts or exits
            if self._proc.poll() is not None:
                return False  # it exited: bad config, or a port was taken
            if pid_file.exists():  # written after every listen socket is bound
                try:
                    for port in ports:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop nginx; keep its error log in ``errors``; remove the prefix."""
        self._end_process()
        if self._prefix is not None:
            self.errors = self.read_errors()
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def _end_process(self) -> None:
        """Fast shutdown (SIGTERM), SIGKILL after STOP_WAIT seconds."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # nginx: TERM = fast shutdown, QUIT would wait for streams
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the master and its workers
                proc.wait()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def read_errors(self) -> str:
        """What nginx has written to its error log so far."""
        log = self._prefix / "errors.log" if self._prefix else None
        return log.read_text(errors="replace") if log and log.exists() else self.errors

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> str:
        return await trio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):  # bounded: STOP_WAIT, then SIGKILL
            await trio.to_thread.run_sync(self.stop)


def nginx_in_front(upstream: str, **settings: Any) -> NginxProxy:
    """``async with nginx_in_front(server.url, read_timeout=2) as url:``"""
    return NginxProxy(upstream, **settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m refimpl.examples.nginx_proxy",
        description="Run nginx on 127.0.0.1 in front of a refimpl server until Ctrl-C (lesson 08).",
    )
    parser.add_argument("--upstream", default="http://127.0.0.1:8000", help="the refimpl server's URL")
    parser.add_argument("--port", type=int, default=8080, help="nginx's HTTP/1.1 port (0: any free one)")
    parser.add_argument(
        "--h2c-port", type=int, default=8081, help="nginx's HTTP/2 port, for gRPC (0: any free one)"
    )
    parser.add_argument(
        "--read-timeout", type=float, default=60.0, help="proxy_read_timeout and grpc_read_timeout, seconds"
    )
    parser.add_argument("--gzip", action="store_true", help="gzip text/event-stream")
    parser.add_argument(
        "--ignore-accel-buffering",
        action="store_true",
        help="proxy_ignore_headers X-Accel-Buffering (as with a server that does not send it)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)
    proxy = NginxProxy(
        args.upstream,
        port=args.port or None,
        h2c_port=args.h2c_port or None,
        read_timeout=args.read_timeout,
        gzip=args.gzip,
        honour_accel_buffering=not args.ignore_accel_buffering,
    )
    if args.print_config:
        port = args.port or free_loopback_port(args.h2c_port)
        print(proxy.config(port, args.h2c_port or free_loopback_port(port)), end="")
        return
    # Ctrl-C and `kill` both raise KeyboardInterrupt here, so the `with`
    # stops nginx (in its own session, it gets neither signal) and removes
    # its directory.  SIGINT explicitly too: a shell starts `&` jobs with it
    # ignored, and this program's one way out is Ctrl-C.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    with proxy as url:
        print(f"nginx: {url} -> {args.upstream}  (gRPC, h2c: {proxy.h2c_url}; Ctrl-C to stop)", flush=True)
        shown = 0  # echo nginx's error log ("upstream timed out ...") as it grows
        try:
            while proxy.running():
                time.sleep(0.5)
                log = proxy.read_errors()
                print(log[shown:], end="", file=sys.stderr, flush=True)
                shown = len(log)
        except KeyboardInterrupt:
            return
    raise SystemExit(f"nginx exited on its own:\n{proxy.errors}")


if __name__ == "__main__":
    main()
