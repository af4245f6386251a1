"""Every change refimpl makes to hypercorn, in one place, checked against its version.

Strategy
--------
refimpl runs on stock hypercorn (its trio worker), and changes three things
about it that no configuration can: a faster write path for token streams,
a watchdog under each WebSocket and each SSE response, and HTTP/2 flow
control that pauses a stream whose window is closed (``hypercorn_h2.py``,
installed from here; lesson 06).  Also installed from here, each in a module
of its own (lesson 14): a clock on slow requests and a cap on connections per
address (``hypercorn_limits.py``), and a connection whose failure ends that
connection, not the server (``hypercorn_contain.py``).  The first two are
subclasses of hypercorn classes that override methods hypercorn does not
promise to keep, and both must replace hypercorn's own classes process-wide,
since hypercorn creates those objects itself.  Such patches are safe only while the code under them
is the code they were written against, so:

* they live here and nowhere else, and :func:`install` is the one place that
  puts them in (``app.serve()`` calls it before every server starts);
* :data:`WRITTEN_FOR` records the hypercorn version they were written
  against and a fingerprint of the source of every hypercorn method they
  override; :func:`install` refuses to start if a name they need is gone and
  logs a warning if the version differs; ``tests/test_hypercorn_patches.py``
  fails as soon as any fingerprint changes, so an upgrade is re-read first.

Lesson 13 teaches the first patch and lesson 03 the second.

1. The write fast path (lesson 13, "cost per token")
====================================================

Every byte hypercorn sends -- each HTTP/1.1 body chunk, each HTTP/2 frame
batch, each WebSocket message -- goes through one method,
``hypercorn.trio.tcp_server.TCPServer.protocol_send(RawData(...))``, which
does this per write (hypercorn 0.18)::

    async with self.send_lock:                     # a trio.Lock
        with trio.CancelScope(shield=True):        # a half-sent write must finish
            await self.stream.send_all(data)       # SocketStream: conflict
                                                   # detector, error translation,
                                                   # socket.send via trio's
                                                   # "try, else wait" helper

All of it is correct and most of it is needed only when the socket is *full*.
DESIGN §4 measured that in a token stream, where a write is one small SSE
event and the socket almost never is full, this wrapping costs about as much
CPU as everything else per token together: the lock and the helper each take
the task through the trio scheduler, and the cancel scope and the context
managers around ``send()`` are Python objects built and torn down per write.

The fast path, taken per write when it is safe, is one non-blocking system
call: ``os.write`` on the socket's file descriptor (on a socket that is
``send(fd, data, 0)``; trio keeps every socket non-blocking, so it never
blocks).  It is safe because of when it is taken:

* **Only on a plain** ``trio.SocketStream``.  Under TLS the bytes on the
  socket are ciphertext that ``trio.SSLStream`` owns, so a TLS connection
  always takes hypercorn's own path.
* **Only when the send lock is free.**  trio's ``Lock`` hands itself directly
  to the next waiter on release, so a free lock means nobody is inside the
  stock path and nobody is queued for it: our bytes go after every byte
  written before them, exactly as if we had taken the lock.  Between the
  check and the system call there is no ``await``, so no other task can run.
* **Only whole writes.**  If the kernel takes *part* of the data, the rest
  goes through the stock path at once (still without an ``await`` in between,
  so nothing can overtake it), shielded from cancellation like the stock
  ``send_all``, so a cancelled writer can never leave half an event on the
  wire.  If it takes nothing (``EAGAIN``, ``BlockingIOError``: the client is
  slow), the whole event takes the stock path, which waits for the socket --
  backpressure (lesson 10) works unchanged.
* **Same errors.**  A closed socket (``fileno() == -1``) takes the stock path,
  which raises and handles it as before; any other ``OSError`` from the
  system call (reset, broken pipe) is handled exactly as the stock path
  handles the ``BrokenResourceError`` trio would have made of it: the
  protocol is told ``Closed()``.

What it gives up: the stock path passes through the scheduler on every write,
which is what lets other tasks run while one writer streams flat out.  The
fast path yields only on every ``YIELD_EVERY``-th write, by sending that
write the stock way: that is also where a cancelled writer (the client went
away, the server is shutting down) learns about it, before any byte of the
event left.  It must be the stock way, lock first, and not a bare
``trio.lowlevel.checkpoint()`` before a fast write: on HTTP/2 many tasks
write to one socket, each sending the bytes it has just taken from the
connection's shared ``h2`` state, and those must reach the socket in the
order they were taken (HPACK's header table is shared, RFC 7541 §2.3.2).  A
writer parked at a bare checkpoint with its bytes in hand found the lock
free when it woke, after another writer's newer bytes had gone out: 200 gRPC
calls on one connection came back with 2-37 % of them broken (ten runs)
(``tests/test_grpc.py``).  The stock path holds the lock across its yield,
so a writer behind it queues instead.  A writer
that waits for its model yields there anyway, and refimpl's own writers also
pass one checkpoint per write when tokens are ready (``Generation.pull``), so
for them the forced yield is a second one every eighth write; it matters to
any other writer on this server that never waits.  Fewer yields are cheaper
and make each one a longer wait in a busy scheduler, which shows as a
slightly longer ITL tail.

``REFIMPL_FASTWRITE=0`` in the environment (``refimpl bench
--no-fastwrite``) keeps hypercorn's write path: the class is then
``hypercorn_contain.ContainedTCPServer``, which the fast path extends (one
connection's failure ends that connection only; always installed).

2. The watchdog (lesson 03): keepalive pings, dead peers, stalled readers
=========================================================================

Three things a long-lived connection needs can only be done *below* ASGI,
because an ASGI application sees messages, never frames or the TCP
connection (the first two are for WebSockets, the third for SSE too):

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
3. **Stalled readers.**  A WebSocket send or an SSE body write blocks when
   the client stops reading (natural backpressure, lesson 10), but
   hypercorn's write is *shielded* from cancellation (DESIGN §4): a
   ``trio.move_on_after`` around ``websocket.send`` in the route, or around
   a response body's ``yield``, can never fire while the write is stuck.
   So the watchdog times the writes itself, one layer down: a frame or a
   body chunk that has waited ``stall_timeout`` seconds to be written means
   the client stopped reading, and the connection is dropped.  (The kernel
   wakes a blocked writer only once a good part of its send buffer has
   drained, so a client that reads, but far slower than the model writes,
   can be dropped too.)

Dropping closes the TCP connection at once: nothing more can be written to a
peer that is dead or not reading.  On a WebSocket that is RFC 6455 §7.1.7
"Fail the WebSocket Connection" without the Close frame; on SSE the client
sees a chunked body without its last chunk, an incomplete message (RFC 9112
§8).  Closing also frees the stuck write (a closed socket wakes it with an
error), the route sees a disconnect, and the reason is left in
:attr:`Watchdog.dropped` so the generation's trace can say
``cancelled(ping_timeout)`` or ``cancelled(stall_timeout)``.  hypercorn's
own shutdown meets the same wall: when its ``graceful_timeout`` has run out
it cancels the connection's tasks, which cannot end a shielded write either,
so the watchdog drops a connection with a write under way then
(``shutdown``), instead of letting it keep the server from stopping.

How it is wired.  :class:`WatchedWrites` is what both streams share: timing
each write, the stall guard, dropping.  :class:`WatchedWSStream` is
hypercorn's WebSocket stream with it and the keepalive;
:class:`WatchedHTTPStream` is hypercorn's request stream with it, timing
every message of the response.  hypercorn's HTTP/1.1 protocol is made to use
both; over HTTP/2 (SSE over h2c or TLS ALPN, gRPC, WebSocket over HTTP/2,
RFC 8441) there is no watchdog: a stalled reader there waits for its stream's
flow-control window, its model paused (``hypercorn_h2.py``).  A route opts in per connection by putting a
:class:`Watchdog` with its settings into the ASGI scope *before* it accepts
(WebSocket) or returns its response (SSE); the stream reads it when the
handshake completes or the response starts.  One stall is not dropped at
once: if the stuck write is a response's very last (the end of the chunked
body), hypercorn has already counted the response as sent and keeps the
connection for the next request; its idle timeout (``keep_alive_timeout``)
closes it, which frees the write.  For WebSockets, the same settings also set
hypercorn's per-message size limit, which hypercorn enforces *while* it
buffers a message (close code 1009, RFC 6455 §7.4.1), so an oversized message
never reaches the route in memory; the watchdog notes that close too
(``message_too_big``), since the route never sees its cause.  Lesson 03
explains all of this; the keepalive itself is ``patterns/heartbeat.py``.

3. Accepting a burst (lesson 13, "a burst of clients")
======================================================

hypercorn's trio worker serves each listening socket with
``trio.serve_listeners`` over a ``trio.SocketListener``, whose ``accept()``
takes *one* connection and then passes through the scheduler, as every trio
operation that succeeds at once does.  So when 500 clients connect together,
the server accepts one connection per round of the scheduler, and each round
also runs every stream that has a token due: the later clients wait in the
kernel's accept queue for seconds while the first ones stream.  asyncio's
loop accepts up to its backlog of connections per wake-up instead.
:class:`BatchedListener` does the same for hypercorn: after the accept that
waited, it also takes every connection already waiting (up to
:data:`ACCEPT_BATCH`) with plain non-blocking ``accept()`` calls, and hands
them out one by one without a trip through the scheduler.  hypercorn builds
its listeners itself, from ``trio.SocketListener`` (a final class), so
:func:`install` gives hypercorn's ``run`` module a view of ``trio`` in which
that name makes a :class:`BatchedListener`; nothing else sees a change.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import inspect
import logging
import os
import socket
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version

import hypercorn.protocol.h11 as hypercorn_h11
import hypercorn.trio.run as hypercorn_run
import trio
from hypercorn.events import Closed, RawData
from hypercorn.events import Event as TCPEvent
from hypercorn.protocol.events import Data, Event, StreamClosed
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import ASGISendEvent, TaskGroup, WebsocketAcceptEvent
from wsproto.events import CloseConnection, Ping
from wsproto.events import Event as WSProtoEvent
from wsproto.frame_protocol import CloseReason

from . import hypercorn_contain, hypercorn_h2, hypercorn_limits
from .patterns import heartbeat

log = logging.getLogger("refimpl")

# region: written-for
#: The hypercorn these patches were written against, and a fingerprint (the
#: first 16 hex digits of the SHA-256 of ``inspect.getsource``) of each
#: hypercorn method they override or rely on the behaviour of.
WRITTEN_FOR = {
    "version": "0.18.0",
    "TCPServer.protocol_send": "225856426bff7be0",
    "WSStream.__init__": "3534d3ebe8f7a1a4",
    "WSStream.handle": "743209f49012b8c7",
    "WSStream._accept": "144623ad2e13fc56",
    "WSStream._send_wsproto_event": "3a4df3f0d2dfd314",
    "HTTPStream.__init__": "c51a65fea53dbfeb",
    "HTTPStream.handle": "6ed2e34c5e708c6a",
    "HTTPStream.app_send": "c806044b99736985",
    "H11Protocol._maybe_recycle": "3ac53f52bc4e65de",
    "worker_serve": "8dc8347a9fc357ca",
    **hypercorn_h2.WRITTEN_FOR,  # HTTP/2 flow control: hypercorn_h2.py
    **hypercorn_contain.WRITTEN_FOR,  # one connection's failure: hypercorn_contain.py
}
# endregion: written-for

#: Writes between two forced trips through the scheduler (see above).
YIELD_EVERY = 8
STOCK_TCP_SERVER = TCPServer
#: What runs each connection without the fast path (hypercorn_contain.py).
CONTAINED_TCP_SERVER = hypercorn_contain.ContainedTCPServer
STOCK_WS_STREAM = WSStream
STOCK_HTTP_STREAM = HTTPStream
#: The ASGI scope key a route sets to a :class:`Watchdog` before it accepts
#: (WebSocket) or returns its response (HTTP/1.1).
SCOPE_KEY = "refimpl.watchdog"


# -- 1. the write fast path ------------------------------------------------------
# region: fast-write
class FastTCPServer(CONTAINED_TCP_SERVER):
    """hypercorn's trio ``TCPServer`` (contained: ``hypercorn_contain.py``) with a
    non-blocking write fast path."""

    _writes = 0

    async def protocol_send(self, event: TCPEvent) -> None:
        # An exact type test: trio.SSLStream is not a SocketStream, nor is
        # anything else a future hypercorn might hand us.
        if type(event) is not RawData or type(self.stream) is not trio.SocketStream:
            return await super().protocol_send(event)
        self._writes += 1
        if self._writes % YIELD_EVERY == 0:
            # Let others run (and deliver a cancel) the stock way, which takes
            # the lock *before* it yields: a bare checkpoint here would let
            # another writer's fast path overtake these bytes (below).
            return await super().protocol_send(event)
        data = event.data
        fd = self.stream.socket.fileno()  # -1 once closed: never a stale fd
        if self.send_lock.locked() or fd == -1 or not data:
            return await super().protocol_send(event)
        try:
            sent = os.write(fd, data)
        except BlockingIOError:  # socket full: wait for it the stock way
            return await super().protocol_send(event)
        except OSError:  # what trio would raise as BrokenResourceError
            return await self.protocol.handle(Closed())
        if sent < len(data):  # partial: the rest, now, before anyone else
            with trio.CancelScope(shield=True):
                await super().protocol_send(RawData(data[sent:]))


# endregion: fast-write


# -- 2. the watchdog (WebSocket and HTTP/1.1) ------------------------------------
@dataclass
class Watchdog:
    """One connection's settings, and why the watchdog dropped it (if it did)."""

    ping_interval: float | None = 20.0  # seconds between pings; None: no pings (WebSocket only)
    ping_timeout: float = 20.0  # seconds a ping may go unanswered
    stall_timeout: float | None = 30.0  # seconds one write may wait; None: never drop
    max_message_bytes: int = 1 << 20  # largest message accepted (else 1009; WebSocket only)
    # Why the connection ended on our side, if it did: "ping_timeout",
    # "stall_timeout", "shutdown" (hypercorn cancelled the connection while a
    # write was stuck), or "message_too_big" (hypercorn sent the 1009).
    dropped: str | None = None
    # Called each time a ping goes out (the route records it in the running
    # generation's trace as a heartbeat), and with the reason when the
    # watchdog drops the connection (the route cancels the generation at
    # once, before the disconnect has travelled up through hypercorn).
    on_ping: Callable[[], None] | None = None
    on_drop: Callable[[str], None] | None = None


class WatchedWrites:
    """What every watched stream shares: it times each write, and drops the
    connection when one has waited ``stall_timeout`` seconds.

    Mixed in *before* a hypercorn stream class, so that its ``super()`` is
    hypercorn's.  The stream passes each write through :meth:`_timed` and
    calls :meth:`_start_watch` with whatever the route put in the scope.
    """

    # Set by hypercorn's stream classes, which both have them.
    scope: dict
    task_group: TaskGroup
    send: Callable[[Event], Awaitable[None]]
    stream_id: int

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.watchdog: Watchdog | None = None  # from the scope, if the route put one there
        self._writing: dict[int, float] = {}  # writes under way -> since when
        self._writes = 0
        self._watch = trio.CancelScope()  # the watch's tasks, until the stream closes

    async def handle(self, event: Event) -> None:
        if isinstance(event, StreamClosed):  # however it ended, stop watching
            self._watch.cancel()
        await super().handle(event)

    async def _timed(self, write: Callable[..., Awaitable[None]], *args: object) -> None:
        """``await write(*args)``, noting since when it waits."""
        self._writes += 1
        n = self._writes
        self._writing[n] = trio.current_time()
        try:
            await write(*args)
        finally:
            del self._writing[n]

    def _start_watch(self, watchdog: object) -> None:
        if self.watchdog is None and isinstance(watchdog, Watchdog):
            self.watchdog = watchdog
            self.task_group.spawn(self._watch_over)

    def _duties(self) -> list[Callable[[], Awaitable[None]]]:
        """The watch's tasks; a stream class adds its own."""
        return [self._stall_guard] if self.watchdog.stall_timeout is not None else []

    async def _watch_over(self) -> None:
        try:
            with self._watch:  # until the stream closes, or we drop it
                await self._do_duties()
        except BaseException as exc:
            # Not our cancel but hypercorn's: it is giving up on the
            # connection (at shutdown, its graceful_timeout ran out).  A write
            # still under way may be stuck, shielded, and would keep the
            # connection and the server from ever ending: drop it now.
            if self._writing and _is_cancelled(exc):
                self._drop("shutdown")
            raise

    async def _do_duties(self) -> None:
        duties = self._duties()
        if len(duties) == 1:
            # One duty (an HTTP stream's stall guard): run it right here.  A
            # nursery and a second task per request cost ~0.2 ms of the
            # server's CPU at every request's end (lesson 13).
            await duties[0]()
            await trio.sleep_forever()  # it returned: it dropped us; wait for the cancel
        async with trio.open_nursery() as nursery:
            for duty in duties:
                nursery.start_soon(duty)
            await trio.sleep_forever()

    # region: stall-guard
    async def _stall_guard(self) -> None:
        limit = self.watchdog.stall_timeout
        while True:
            oldest = min(self._writing.values(), default=None)
            now = trio.current_time()
            # The same sum as the deadline below: ``now - oldest >= limit``
            # can round just under the limit when the clock lands exactly on
            # that deadline, and the guard would spin on a deadline passed.
            if oldest is not None and now >= oldest + limit:
                return self._drop("stall_timeout")
            # The next moment a write that is waiting now (or one that starts
            # later) could have waited too long.
            await trio.sleep_until((now if oldest is None else oldest) + limit)

    # endregion: stall-guard

    def _drop(self, reason: str) -> None:
        """Close the TCP connection now; the route sees a disconnect."""
        self.watchdog.dropped = reason
        if self.watchdog.on_drop is not None:
            self.watchdog.on_drop(reason)
        self._watch.cancel()
        self.task_group.spawn(self._close)

    async def _close(self) -> None:
        # "This stream is over" is how hypercorn's HTTP/1.1 protocol learns
        # to close the socket.  A task of its own, shielded: hypercorn may be
        # cancelling the connection's tasks, and the closing must still happen.
        with trio.CancelScope(shield=True):
            await self.send(StreamClosed(stream_id=self.stream_id))


class WatchedWSStream(WatchedWrites, WSStream):
    """hypercorn's WebSocket stream, plus keepalive and the stall guard."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._heard = trio.Event()  # set when bytes arrive from the peer

    async def handle(self, event: Event) -> None:
        if isinstance(event, Data):  # WebSocket bytes from the peer: it is alive
            self._heard.set()
        await super().handle(event)

    async def _accept(self, message: WebsocketAcceptEvent) -> None:
        watchdog = self.scope.get(SCOPE_KEY)
        if isinstance(watchdog, Watchdog):
            # Before the handshake answer leaves: the client may send at once.
            self.buffer.max_length = watchdog.max_message_bytes
        await super()._accept(message)
        self._start_watch(watchdog)

    async def _send_wsproto_event(self, event: WSProtoEvent) -> None:
        # Every frame we write passes here.
        too_big = isinstance(event, CloseConnection) and event.code == CloseReason.MESSAGE_TOO_BIG
        if too_big and self.watchdog is not None:  # hypercorn's 1009: the route never saw it
            self.watchdog.dropped = "message_too_big"
        await self._timed(super()._send_wsproto_event, event)

    def _duties(self) -> list[Callable[[], Awaitable[None]]]:
        pings = [self._keepalive] if self.watchdog.ping_interval is not None else []
        return pings + super()._duties()

    # region: keepalive
    async def _keepalive(self) -> None:
        dog = self.watchdog
        await heartbeat.keep_websocket_alive(self, dog.ping_interval, dog.ping_timeout)
        self._drop("ping_timeout")  # it returns only when the peer is dead

    # heartbeat.PingTarget: what keep_websocket_alive needs of a connection.
    def listen(self) -> trio.Event:
        self._heard = trio.Event()
        return self._heard

    def send_ping(self, payload: bytes) -> None:
        # In its own task: keep_websocket_alive must not wait for the write.
        self.task_group.spawn(self._send_wsproto_event, Ping(payload))
        if self.watchdog.on_ping is not None:
            self.watchdog.on_ping()

    # endregion: keepalive


class WatchedHTTPStream(WatchedWrites, HTTPStream):
    """hypercorn's HTTP/1.1 request/response stream, plus the stall guard."""

    async def app_send(self, message: ASGISendEvent | None) -> None:
        # Every part of the response passes here: status and headers, each
        # body chunk, the end.  The route put its Watchdog (if any) in the
        # scope before it returned the response, so it is there at the start.
        if message is not None and message["type"] == "http.response.start":
            self._start_watch(self.scope.get(SCOPE_KEY))
        if self.watchdog is None:  # not watched: stock behaviour, no timing
            return await super().app_send(message)
        await self._timed(super().app_send, message)


def _is_cancelled(exc: BaseException) -> bool:
    """A trio cancellation, alone or inside a nursery's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(trio.Cancelled) is not None
    return isinstance(exc, trio.Cancelled)


# -- 3. accepting a burst ----------------------------------------------------------
#: Connections taken from the kernel's accept queue per wake-up, at most.
ACCEPT_BATCH = 100
#: accept() errors that concern only the connection being accepted.
_SKIPPABLE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


# region: batched-accept
class BatchedListener(trio.abc.Listener[trio.SocketStream]):
    """A ``trio.SocketListener`` that takes every waiting connection at once."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._listener = trio.SocketListener(sock)
        # The same listening socket as a plain non-blocking one, for the
        # accepts that must not pass through the scheduler.
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        self._raw.setblocking(False)
        self._waiting: collections.deque[trio.SocketStream] = collections.deque()

    async def accept(self) -> trio.SocketStream:
        if self._waiting:
            await trio.lowlevel.checkpoint_if_cancelled()
            return self._waiting.popleft()
        stream = await self._listener.accept()  # waits for one, the trio way
        while len(self._waiting) < ACCEPT_BATCH - 1:  # then takes the rest now
            try:
                conn, _ = self._raw.accept()
            except BlockingIOError:  # the queue is empty
                break
            except OSError as exc:
                if exc.errno in _SKIPPABLE:  # that client gave up: the next one
                    continue
                break  # e.g. EMFILE: serve_listeners' own accept will see it
            conn.setblocking(False)
            self._waiting.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return stream

    async def aclose(self) -> None:
        self._raw.close()
        while self._waiting:
            await self._waiting.popleft().aclose()
        await self._listener.aclose()


# endregion: batched-accept


def _trio_with_batched_accept() -> types.ModuleType:
    """``trio`` as hypercorn's ``run`` module sees it: SocketListener batched."""
    view = types.ModuleType("trio (refimpl: batched accept)")
    view.__getattr__ = lambda name: getattr(trio, name)  # type: ignore[method-assign]
    view.SocketListener = BatchedListener  # type: ignore[attr-defined]
    return view


_TRIO_WITH_BATCHED_ACCEPT = _trio_with_batched_accept()


# -- installing, once, after checking -----------------------------------------
def _fingerprint(func: object) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


def fingerprints() -> dict[str, str]:
    """The installed hypercorn's version and method fingerprints, in the
    shape of :data:`WRITTEN_FOR`."""
    methods = {
        "TCPServer.protocol_send": STOCK_TCP_SERVER.protocol_send,
        "WSStream.__init__": STOCK_WS_STREAM.__init__,
        "WSStream.handle": STOCK_WS_STREAM.handle,
        "WSStream._accept": STOCK_WS_STREAM._accept,
        "WSStream._send_wsproto_event": STOCK_WS_STREAM._send_wsproto_event,
        "HTTPStream.__init__": STOCK_HTTP_STREAM.__init__,
        "HTTPStream.handle": STOCK_HTTP_STREAM.handle,
        "HTTPStream.app_send": STOCK_HTTP_STREAM.app_send,
        "H11Protocol._maybe_recycle": hypercorn_h11.H11Protocol._maybe_recycle,
        "worker_serve": hypercorn_run.worker_serve,
    }
    return {
        "version": version("hypercorn"),
        **{name: _fingerprint(f) for name, f in methods.items()},
        **hypercorn_h2.fingerprints(),
        **hypercorn_contain.fingerprints(),
    }


# region: install
def install(fastwrite: bool | None = None) -> bool:
    """Put the patches in; returns whether the write fast path is on.

    The watchdog goes into hypercorn's HTTP/1.1 protocol only, for its
    WebSocket and its request streams; HTTP/2 gets the flow-control fix of
    ``hypercorn_h2.py`` instead (off with ``REFIMPL_H2_FLOW=0``).

    ``fastwrite=None`` reads ``REFIMPL_FASTWRITE`` (anything but ``0`` means
    on); ``False`` keeps hypercorn's own write path (``ContainedTCPServer``,
    ``hypercorn_contain.py``, which is installed either way).  The batched accept
    is on unless ``REFIMPL_BATCH_ACCEPT=0`` (for measuring it, lesson 13).
    Idempotent and cheap, so ``serve()`` calls it each time a server starts.
    """
    if (
        hypercorn_run.TCPServer not in (STOCK_TCP_SERVER, CONTAINED_TCP_SERVER, FastTCPServer)
        or hypercorn_h11.WSStream not in (STOCK_WS_STREAM, WatchedWSStream)
        or hypercorn_h11.HTTPStream not in (STOCK_HTTP_STREAM, WatchedHTTPStream)
        or hypercorn_run.trio not in (trio, _TRIO_WITH_BATCHED_ACCEPT)
    ):
        raise RuntimeError(
            "hypercorn no longer creates the classes refimpl patches; see hypercorn_patches.py"
        )
    found = fingerprints()
    if found != WRITTEN_FOR:
        changed = sorted(k for k in WRITTEN_FOR if k != "version" and found.get(k) != WRITTEN_FOR[k])
        log.warning(
            "refimpl's hypercorn patches were written for hypercorn %s; this is %s%s: re-read "
            "hypercorn_patches.py and hypercorn_h2.py against it",
            WRITTEN_FOR["version"],
            found["version"],
            f", and the source of {', '.join(changed)} changed" if changed else "",
        )
    hypercorn_h2.install()  # HTTP/2 flow control; refuses (installing nothing) if it cannot
    hypercorn_limits.install()  # slow requests, connections per address: hypercorn_limits.py
    if fastwrite is None:
        fastwrite = os.environ.get("REFIMPL_FASTWRITE", "1") != "0"
    hypercorn_run.TCPServer = FastTCPServer if fastwrite else CONTAINED_TCP_SERVER
    if os.environ.get("REFIMPL_BATCH_ACCEPT", "1") != "0":
        hypercorn_run.trio = _TRIO_WITH_BATCHED_ACCEPT
    else:
        hypercorn_run.trio = trio
    # A connection whose route put no Watchdog in its scope behaves exactly
    # like stock hypercorn.
    hypercorn_h11.WSStream = WatchedWSStream
    hypercorn_h11.HTTPStream = WatchedHTTPStream
    return fastwrite


# endregion: install
