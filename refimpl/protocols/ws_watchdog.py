"""A watchdog under each WebSocket: keepalive pings, dead peers, stalled readers.

Strategy
--------
Three things a long-lived socket needs can only be done *below* ASGI, because
an ASGI application sees messages, never frames or the TCP connection:

1. **Keepalive.**  RFC 6455 §5.5.2-5.5.3: either side may send a Ping control
   frame and the other must answer with a Pong "as soon as is practical".
   Every client library (browsers, ``websockets``, ``trio-websocket``) answers
   on its own, so a ping every ``ping_interval`` seconds keeps NATs and proxies
   from timing out an idle socket *and* proves the peer is alive.  ASGI has
   no message to send a ping, and hypercorn's own ``websocket_ping_interval``
   sends pings but ignores the answers, so it cannot notice a dead peer.
2. **Dead peers.**  A peer that vanished without a FIN (laptop lid, lost Wi-Fi,
   a frozen process: a *half-open* connection) looks exactly like a quiet one.
   We count any bytes from the peer as a sign of life; if nothing at all
   arrives within ``ping_timeout`` seconds of a ping, the peer is dead.
3. **Stalled readers.**  A WebSocket send blocks when the client stops reading
   (natural backpressure, lesson 10), but hypercorn's write is *shielded* from
   cancellation (DESIGN §4): a ``trio.move_on_after`` around
   ``websocket.send`` in the route can never fire while the write is stuck.
   So the watchdog times the writes itself, one layer down: a frame that has
   waited ``stall_timeout`` seconds to be written means the client stopped
   reading, and the connection is dropped.

Dropping means RFC 6455 §7.1.7 "Fail the WebSocket Connection" without the
Close frame: one cannot be written to a peer that is dead or not reading, so
we close the TCP connection at once.  That also frees the stuck write (a
closed socket wakes it with an error), the route sees a disconnect, and the
reason is left in :attr:`Watchdog.dropped` so the generation's trace can say
``cancelled(ping_timeout)`` or ``cancelled(stall_timeout)``.

How it is wired.  :class:`WatchedWSStream` subclasses hypercorn's WebSocket
stream; :func:`install` makes hypercorn's HTTP/1.1 protocol use it (the same
kind of process-wide swap as ``fastwrite.py``; WebSocket over HTTP/2, RFC
8441, keeps stock behaviour).  A route opts in per connection by putting a
:class:`Watchdog` with its settings into the ASGI scope *before* it accepts;
the stream reads it when the handshake completes.  The same settings also set
hypercorn's per-message size limit, which hypercorn enforces *while* it
buffers a message (close code 1009, RFC 6455 §7.4.1), so an oversized message
never reaches the route in memory; the watchdog notes that close too
(``message_too_big``), since the route never sees its cause.  Lesson 03
explains all of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import hypercorn.protocol.h11 as hypercorn_h11
import trio
from hypercorn.protocol.events import Data, Event, StreamClosed
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import WebsocketAcceptEvent
from wsproto.events import CloseConnection, Ping
from wsproto.events import Event as WSProtoEvent
from wsproto.frame_protocol import CloseReason

#: The ASGI scope key a route sets to a :class:`Watchdog` before accepting.
SCOPE_KEY = "refimpl.watchdog"


@dataclass
class Watchdog:
    """One connection's settings, and why the watchdog dropped it (if it did)."""

    ping_interval: float | None = 20.0  # seconds between pings; None: no pings
    ping_timeout: float = 20.0  # seconds a ping may go unanswered
    stall_timeout: float | None = 30.0  # seconds a frame may wait to be written
    max_message_bytes: int = 1 << 20  # largest message accepted (else 1009)
    # Why the connection ended on our side, if it did: "ping_timeout",
    # "stall_timeout", or "message_too_big" (hypercorn sent the 1009).
    dropped: str | None = None


class WatchedWSStream(WSStream):
    """hypercorn's WebSocket stream, plus :class:`Watchdog` duties."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.watchdog: Watchdog | None = None  # from the scope, at accept
        self._heard = trio.Event()  # set when bytes arrive from the peer
        self._writing: dict[int, float] = {}  # frames being written -> since when
        self._frames = 0
        self._watch = trio.CancelScope()

    async def handle(self, event: Event) -> None:
        if isinstance(event, Data):  # WebSocket bytes from the peer: it is alive
            self._heard.set()
        elif isinstance(event, StreamClosed):  # however it ended, stop watching
            self._watch.cancel()
        await super().handle(event)

    async def _accept(self, message: WebsocketAcceptEvent) -> None:
        watchdog = self.scope.get(SCOPE_KEY)
        if isinstance(watchdog, Watchdog):
            self.watchdog = watchdog
            # Before the handshake answer leaves: the client may send at once.
            self.buffer.max_length = watchdog.max_message_bytes
        await super()._accept(message)
        if self.watchdog is not None:
            self.task_group.spawn(self._watch_over)

    async def _send_wsproto_event(self, event: WSProtoEvent) -> None:
        # Every frame we write passes here; remember since when it waits.
        if isinstance(event, CloseConnection) and event.code == CloseReason.MESSAGE_TOO_BIG:
            if self.watchdog is not None:  # hypercorn's 1009: the route never saw it
                self.watchdog.dropped = "message_too_big"
        self._frames += 1
        frame = self._frames
        self._writing[frame] = trio.current_time()
        try:
            await super()._send_wsproto_event(event)
        finally:
            del self._writing[frame]

    async def _watch_over(self) -> None:
        with self._watch:
            async with trio.open_nursery() as nursery:
                if self.watchdog.ping_interval is not None:
                    nursery.start_soon(self._keepalive)
                if self.watchdog.stall_timeout is not None:
                    nursery.start_soon(self._stall_guard)

    # region: keepalive
    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.watchdog.ping_interval)
            self._heard = trio.Event()
            # In its own task: a ping stuck behind a stalled write must not
            # stop the clock that will notice it.
            self.task_group.spawn(self._send_wsproto_event, Ping(b"refimpl"))
            with trio.move_on_after(self.watchdog.ping_timeout) as timer:
                await self._heard.wait()  # the pong, or any other frame
            if timer.cancelled_caught:  # nothing at all came back: dead
                return self._drop("ping_timeout")
    # endregion: keepalive

    # region: stall-guard
    async def _stall_guard(self) -> None:
        limit = self.watchdog.stall_timeout
        while True:
            oldest = min(self._writing.values(), default=None)
            now = trio.current_time()
            if oldest is not None and now - oldest >= limit:
                return self._drop("stall_timeout")
            # The next moment a write that is waiting now (or one that starts
            # later) could have waited too long.
            await trio.sleep_until((now if oldest is None else oldest) + limit)
    # endregion: stall-guard

    def _drop(self, reason: str) -> None:
        """Close the TCP connection now; the route sees a disconnect."""
        self.watchdog.dropped = reason
        self._watch.cancel()
        # "This stream is over" is how hypercorn's HTTP/1.1 protocol learns
        # to close the socket; a task of its own, so no cancel stops it.
        self.task_group.spawn(self.send, StreamClosed(stream_id=self.stream_id))


def install() -> None:
    """Make hypercorn's HTTP/1.1 protocol create :class:`WatchedWSStream`s.

    Process-wide and idempotent; a connection whose route put no
    :class:`Watchdog` in its scope behaves exactly like stock hypercorn.
    """
    hypercorn_h11.WSStream = WatchedWSStream
