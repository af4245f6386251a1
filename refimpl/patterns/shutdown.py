"""Graceful shutdown: drain the running generations before the server stops.

Strategy
--------
A server that stops mid-answer should say so, to every client, in that
client's protocol: the same promise as a mid-stream error (lesson 07),
with the server as the cause.  hypercorn alone cannot keep it.  On its
shutdown trigger it stops listening, gives open connections
``graceful_timeout`` seconds (3 by default), then cancels them: a stream
still running is cut in the middle of its body (curl: "transfer closed with
outstanding read data remaining"), a WebSocket gets close 1011, and the
app's own shutdown hook runs only afterwards, when no client is left to
tell.  So the drain is ours, and it runs *before* hypercorn's, inside the
trigger hypercorn waits on (``app.serve()`` wraps it):

1. **Stop admitting.**  New generations get ``503 server_shutting_down``
   with ``Retry-After`` (on a WebSocket, an ``error`` message): a load
   balancer or client retries elsewhere.  The port stays open meanwhile,
   so a client is told, not refused at the TCP level.
2. **Let running generations finish**, for up to ``--drain-timeout``
   seconds (default 10): most answers are seconds long, and an answer
   finished is worth more than a fast exit.
3. **End the rest, each in its own protocol** (RFC 6455 §7.4.1 for the
   WebSocket code): the generation is cancelled with reason ``shutdown``
   (trace ``cancelled(shutdown)``); an SSE stream gets ``event: error`` with
   code ``server_shutdown`` and ends without ``[DONE]``; a non-streamed
   request gets ``503 server_shutdown``; every WebSocket, busy or idle, is
   closed with 1001 "going away".
4. Return, and let hypercorn close what is left (idle keep-alive
   connections) within its own ``graceful_timeout``.

A second SIGINT/SIGTERM during the drain ends the server at once
(``cli.py``), and the drain logs what it waits for, so an operator sees why
the server has not exited yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("refimpl")

#: How long the last step waits for the writers to send their endings.
FAREWELL_SECONDS = 1.0


class Shutdown:
    """One per app: the connections to tell, and the drain that tells them."""

    def __init__(self, engine: Engine, drain_timeout: float) -> None:
        self.engine = engine
        self.drain_timeout = drain_timeout
        # WebSockets open now, each with a way to close it with 1001.
        self._sockets: dict[object, Callable[[], None]] = {}
        self._all_closed: trio.Event | None = None  # made by drain()
        self.draining = False

    def track(self, conn: object, going_away: Callable[[], None]) -> None:
        self._sockets[conn] = going_away

    def untrack(self, conn: object) -> None:
        self._sockets.pop(conn, None)
        if not self._sockets and self._all_closed is not None:
            self._all_closed.set()

    # region: drain
    async def drain(self) -> None:
        engine = self.engine
        self.draining, engine.accepting = True, False  # 1. new requests: 503
        if engine.active:
            log.info(
                "draining: waiting up to %g s for %d generation(s) to finish (a second Ctrl-C stops now)",
                self.drain_timeout,
                len(engine.active),
            )
        with trio.move_on_after(self.drain_timeout):  # 2. let them finish
            await engine.wait_idle()
        if engine.active:
            log.info("drain timeout: ending %d generation(s) with server_shutdown", len(engine.active))
        engine.cancel_all("shutdown")  # 3. the rest: an error event each
        self._all_closed = trio.Event()
        if not self._sockets:
            self._all_closed.set()
        for going_away in list(self._sockets.values()):  # ... and close 1001
            going_away()
        with trio.move_on_after(FAREWELL_SECONDS):  # their close frames leave
            await self._all_closed.wait()

    # endregion: drain
