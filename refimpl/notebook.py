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
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import httpx
import trio

from .app import create_app, serve
from .config import Config


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
