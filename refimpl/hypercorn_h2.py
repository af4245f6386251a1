"""HTTP/2 flow control in hypercorn: a stream whose window is closed stops its own writer.

Strategy
--------
HTTP/2 runs many streams over one TCP connection, so TCP's backpressure (a
full socket blocks the write, lesson 10) cannot tell *which* stream's reader
is slow.  HTTP/2 adds its own flow control a level up (RFC 9113 §5.2): the
receiver grants each stream, and the connection as a whole, a window of
bytes it is ready to take (65,535 to start with, §6.9.2); the sender may
send DATA only while both windows have room (§6.9.1), and room comes back
only with a WINDOW_UPDATE frame (§6.9), which a client sends as it consumes
what it received.  A stream whose reader stops is stopped on the wire after
one window while its siblings, with windows of their own, go on.  What the
sender does meanwhile with the bytes its application keeps writing is its
own business: the RFC only says they must not go out.

hypercorn 0.18 (``hypercorn/protocol/h2.py``) keeps a ``StreamBuffer`` per
stream between its writer and the connection's one sending task.  The
writer ``push``-es and should wait once the buffer holds
``BUFFER_HIGH_WATER`` (32 KiB); the sending task ``pop``-s what the window
allows and should let the writer go on when the buffer runs low::

    data = bytes(self.buffer[:length])      # length: at most the window
    del self.buffer[:length]
    if len(data) < BUFFER_LOW_WATER:        # what was *taken*, not what is left
        await self._paused.set()

That is right while the window is open (a small pop means a nearly empty
buffer) and wrong when it is closed: the pop takes 0 bytes, 0 is below low
water, and the writer is let go with its buffer full.  Its next ``push``
wakes the sending task (``stream_send`` unblocks the stream), which pops 0
bytes again, and so on: every write returns at once, the buffer grows
without bound, and a pull engine (``engine.py``), which counts on a blocked
write to pause the model, runs its model on.  Measured with one stream's
window held shut for 8 s at ``itl_ms`` 0: stock made 4.3 million tokens and
the server's RSS grew by 1,024 MiB (``coalesce``: 11.9 million tokens,
+62 MiB); with this module, 384 tokens (``coalesce``: 24,576, its cap
included) and no growth.  Besides, ``push`` waits *once*, on an event an
earlier pop may have set long ago.

The fix, in two parts:

* :class:`FlowStreamBuffer` lets the writer go when what is *left* is below
  low water, and its ``push`` waits in a loop until the buffer is below high
  water, clearing the event before each wait, so a stale release lets
  nothing through.  ``close()`` (the sender found the stream reset)
  empties the buffer, which ends the wait as before; a connection that
  goes away cancels the writer, as the route sees the disconnect.
* :class:`FlowH2Protocol` hands a write larger than :data:`PIECE` to the
  buffer a piece at a time, so a stream's buffer stays below
  :data:`MOST_HELD` (48 KiB) however large one write is (a non-streamed
  answer, a ``coalesce`` chunk) instead of holding a copy of all of it.

Why it is safe.  The bytes and their order are unchanged (one task writes a
stream, piece after piece); only *when* a ``push`` returns changes, and it
returns as soon as the buffer has drained below low water.  What must stay right is the
wake-up.  ``H2Protocol._send_data`` parks a stream in its priority tree
(``self.priority.block``) whenever a pop returns nothing, and two things
unpark it: ``stream_send``, before it buffers data (and at a body's end),
and ``_window_updated``, on a WINDOW_UPDATE, a SETTINGS change or a reset.
Those are exactly the two ways a pop can have something again: new bytes or
a wider window.  So every piece goes through stock ``stream_send``, never
into the buffer behind its back: pieces appended inside ``push`` after its
wait would find the stream parked (the sender drains the buffer to empty
before the writer runs), with bytes to send and an open window, and nothing
would ever wake it (``test_a_large_write_into_an_open_window_...`` hangs
that way).  We override ``push``, ``pop`` and ``stream_send`` and rely on
``close``, ``_send_data``, ``_window_updated`` and ``_create_stream`` (which
builds the buffers); :data:`WRITTEN_FOR` fingerprints all seven, and
``hypercorn_patches.install()`` checks them and calls :func:`install`.
Lesson 06 (HTTP/2) teaches this; lesson 10 the backpressure it keeps.

Data for a finished stream (lesson 14).  Once a stream's response is
complete hypercorn forgets the stream, but its client may still be sending
the request body: legal, the stream is only half-closed (RFC 9113 §8.1),
and it happens after every early answer (a 408, 404, 413 or 401 sent before
the body was read).  hypercorn looked the stream up for that DATA
(``_handle_events``), failed with ``KeyError``, and the exception ended the
whole server (measured over h2c and TLS; ``tests/test_slow_requests.py`` causes it).
:class:`FinishedStreams`, the protocol's table of streams, answers for a
stream it no longer holds with a stand-in that drops the data; hypercorn
still acknowledges it for flow control.  (``REFIMPL_H2_FLOW=0``, stock
classes, gives the crash back; ``hypercorn_contain.py`` would then keep it
to one connection.)
"""

from __future__ import annotations

import os

import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h2 as hypercorn_h2
from hypercorn.protocol.events import Body, Data
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, BufferCompleteError

# region: h2-written-for
#: A fingerprint of each hypercorn method this module overrides or relies on
#: (``hypercorn_patches.WRITTEN_FOR`` includes them, under its version check).
WRITTEN_FOR = {
    "StreamBuffer.push": "4ca8ee7b0fec5200",
    "StreamBuffer.pop": "9eb73c8833891346",
    "StreamBuffer.close": "f6a32abdf98270c5",
    "H2Protocol.stream_send": "d8fc824e2770ba5c",
    "H2Protocol._send_data": "a89ce4286f369820",
    "H2Protocol._window_updated": "80fdf9db83dd916e",
    "H2Protocol._create_stream": "91eb123ddf247ede",
}
# endregion: h2-written-for
#: And those the fix for data on a finished stream overrides or relies on (lesson 14).
WRITTEN_FOR |= {"H2Protocol.__init__": "d577a96e2eb647a4", "H2Protocol._handle_events": "3378aef0a2348f0d"}

#: The largest write buffered whole: one DATA frame of the default maximum
#: size (RFC 9113 §4.2, 16,384 bytes).
PIECE = BUFFER_HIGH_WATER // 2
#: A stream's buffer stays below this: the writer adds at most a piece while
#: it is below high water.
MOST_HELD = BUFFER_HIGH_WATER + PIECE
STOCK_STREAM_BUFFER = hypercorn_h2.StreamBuffer
STOCK_H2_PROTOCOL = hypercorn_h2.H2Protocol


# region: h2-stream-buffer
class FlowStreamBuffer(STOCK_STREAM_BUFFER):
    """hypercorn's per-stream buffer, whose writer waits while the window is closed."""

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        # Until the sending task has drained us below low water.  A release
        # from an earlier pop must not count: clear first, and look again
        # after every wake-up.  close() empties the buffer, which ends it too.
        while len(self.buffer) >= BUFFER_HIGH_WATER:
            await self._paused.clear()
            await self._paused.wait()

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)  # 0 while the window is closed
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:  # what is *left*: the fix
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


# endregion: h2-stream-buffer


# region: h2-finished-streams
class _FinishedStream:
    """Stands in for an HTTP/2 stream whose response is complete: the client
    may go on sending its body (RFC 9113 §8.1); it goes nowhere."""

    async def handle(self, event: object) -> None:
        return None


class FinishedStreams(dict):
    """hypercorn's ``H2Protocol.streams``: a stream it no longer holds is one
    it finished; hypercorn still acknowledges the data (flow control)."""

    def __missing__(self, stream_id: int) -> _FinishedStream:
        return _FinishedStream()


# endregion: h2-finished-streams


# region: h2-protocol
class FlowH2Protocol(STOCK_H2_PROTOCOL):
    """hypercorn's HTTP/2 protocol, which buffers a large write a piece at a time."""

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, Body | Data) or len(event.data) <= PIECE:
            return await super().stream_send(event)
        # Each piece through stock stream_send, which unparks the stream
        # before it buffers the piece (see above); each push returns once
        # the buffer is below high water again.
        whole = memoryview(event.data)
        for start in range(0, len(whole), PIECE):
            if event.stream_id not in self.stream_buffers:
                return  # reset or closed meanwhile: stock drops the rest too
            piece = bytes(whole[start : start + PIECE])
            await super().stream_send(type(event)(stream_id=event.stream_id, data=piece))

    # endregion: h2-protocol

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.streams = FinishedStreams(self.streams)  # data for a finished stream: dropped (above)


def fingerprints() -> dict[str, str]:
    """The installed hypercorn's fingerprints of the methods in :data:`WRITTEN_FOR`."""
    from .hypercorn_patches import _fingerprint  # not at the top: hypercorn_patches imports us

    methods = {
        "StreamBuffer.push": STOCK_STREAM_BUFFER.push,
        "StreamBuffer.pop": STOCK_STREAM_BUFFER.pop,
        "StreamBuffer.close": STOCK_STREAM_BUFFER.close,
        "H2Protocol.stream_send": STOCK_H2_PROTOCOL.stream_send,
        "H2Protocol._send_data": STOCK_H2_PROTOCOL._send_data,
        "H2Protocol._window_updated": STOCK_H2_PROTOCOL._window_updated,
        "H2Protocol._create_stream": STOCK_H2_PROTOCOL._create_stream,
        "H2Protocol.__init__": STOCK_H2_PROTOCOL.__init__,
        "H2Protocol._handle_events": STOCK_H2_PROTOCOL._handle_events,
    }
    return {name: _fingerprint(method) for name, method in methods.items()}


# region: h2-install
def install(enabled: bool | None = None) -> None:
    """Make hypercorn build our two classes (``hypercorn_patches.install()``
    calls this once it has compared the fingerprints).  Idempotent; refuses,
    changing nothing, if hypercorn no longer builds the classes we replace.
    ``enabled=None`` reads ``REFIMPL_H2_FLOW`` (``0``: hypercorn's own
    classes, the broken version lesson 06 runs side by side)."""
    if hypercorn_protocol.H2Protocol not in (STOCK_H2_PROTOCOL, FlowH2Protocol) or (
        hypercorn_h2.StreamBuffer not in (STOCK_STREAM_BUFFER, FlowStreamBuffer)
    ):
        raise RuntimeError("hypercorn no longer creates the classes refimpl patches; see hypercorn_h2.py")
    if enabled is None:
        enabled = os.environ.get("REFIMPL_H2_FLOW", "1") != "0"
    # ProtocolWrapper (hypercorn/protocol/__init__.py) builds each
    # connection's H2Protocol; H2Protocol._create_stream each StreamBuffer.
    hypercorn_protocol.H2Protocol = FlowH2Protocol if enabled else STOCK_H2_PROTOCOL
    hypercorn_h2.StreamBuffer = FlowStreamBuffer if enabled else STOCK_STREAM_BUFFER


# endregion: h2-install
