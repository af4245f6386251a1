"""A write fast path for hypercorn's trio worker (lesson 13, "cost per token").

Strategy
--------
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
fast path yields only on every ``YIELD_EVERY``-th write, with
``trio.lowlevel.checkpoint()`` *before* that write: that is also where a
cancelled writer (the client went away, the server is shutting down) learns
about it, before any byte of the event left, as in the stock path.  A writer
that waits for its model yields there anyway; the forced yield matters only
to one that never waits.  Fewer yields are cheaper and make each one a longer
wait in a busy scheduler, which shows as a slightly longer ITL tail.

:func:`install` puts :class:`FastTCPServer` where hypercorn's trio worker
looks up its connection class; ``REFIMPL_FASTWRITE=0`` in the environment
(``refimpl bench --no-fastwrite``) keeps the stock class.  It changes the
whole process, so every hypercorn trio server in it behaves the same.
"""

from __future__ import annotations

import os

import hypercorn.trio.run as hypercorn_run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

#: Writes between two forced trips through the scheduler (see above).
YIELD_EVERY = 8
STOCK = TCPServer


# region: fast-write
class FastTCPServer(TCPServer):
    """hypercorn's trio ``TCPServer`` with a non-blocking write fast path."""

    _writes = 0

    async def protocol_send(self, event: Event) -> None:
        # An exact type test: trio.SSLStream is not a SocketStream, nor is
        # anything else a future hypercorn might hand us.
        if type(event) is not RawData or type(self.stream) is not trio.SocketStream:
            return await super().protocol_send(event)
        self._writes += 1
        if self._writes % YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()  # let others run; deliver a cancel
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


def install(enabled: bool | None = None) -> bool:
    """Make hypercorn's trio worker use :class:`FastTCPServer` for new
    connections; returns whether the fast path is on.

    ``enabled=None`` reads ``REFIMPL_FASTWRITE`` (anything but ``0`` means
    on); ``False`` puts the stock class back.  Idempotent, and re-read on every
    call, so ``serve()`` can call it each time it starts a server.
    """
    if enabled is None:
        enabled = os.environ.get("REFIMPL_FASTWRITE", "1") != "0"
    hypercorn_run.TCPServer = FastTCPServer if enabled else STOCK
    return enabled
