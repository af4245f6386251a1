"""One connection's failure stays with that connection: hypercorn's ``TCPServer``, contained.

Strategy
--------
hypercorn's trio worker serves every connection with ``trio.serve_listeners``,
whose handler is hypercorn's ``TCPServer.run``, all in one nursery.  trio's
rule for a nursery is that an exception in one child cancels its siblings
and leaves through the parent (structured concurrency): right for the tasks
of one job, wrong for a server, where a child is one client.  hypercorn
catches what an *application* raises (``Error in ASGI Framework``) and
``OSError`` from the socket, and nothing else: any other exception from its
own protocol code ends ``hypercorn.serve``, and every later client is refused.
The server fuzz found one (lesson 14, ``tests/test_fuzz_server.py``).

**The race.**  ``POST`` with ``Connection: close``, ``Content-Length: 10`` and
a longer body, to a route that answers before it reads (a 415).  Two tasks of
the connection then write at once: the application its 415, and the reading
task h11's 400 for the extra bytes (RFC 9112 §9.3: after a ``close`` request
nothing may follow).  Writes queue on the connection's ``send_lock``, but the
close did not: ``TCPServer._close`` calls ``send_eof()`` outside the lock, and
trio's ``SocketStream`` holds its one-writer-at-a-time guard across a
checkpoint inside ``send_eof``.  A write that arrived then raised
``trio.BusyResourceError``, which ``TCPServer.protocol_send`` does not catch,
and the server ended.  Measured: 3-12 tries of that request, fast path on or
off (``tests/test_fuzz_server.py``).

The two fixes (:class:`ContainedTCPServer`, which ``hypercorn_patches.py``
installs, and its fast path subclasses):

* **At the cause**, ``_close`` sends its EOF holding ``send_lock``, so a
  writer that comes meanwhile queues, then finds the stream closed (which it
  handles).  If the lock is *held*, a write is under way, maybe stuck (a
  client that does not read: its write is shielded and waits for ever), and
  waiting for it could pin the close: the stream is closed without the EOF,
  which frees that write with an error, as hypercorn always did when its
  ``send_eof`` met a busy stream.
* **In depth**, :meth:`ContainedTCPServer.run` catches any ``Exception`` that
  leaves the connection (``except*``: a trio cancellation, which belongs to
  the server, passes through), logs it at ERROR with its traceback (a bug
  to fix, so it must be seen: the fault-load bench counts tracebacks), closes
  that connection, and returns: the server serves on.

``tests/test_contained_connections.py`` proves both.  Lesson 14 explains this
module; :data:`WRITTEN_FOR` fingerprints the two hypercorn methods it
overrides, under ``hypercorn_patches.py``'s version check.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("refimpl")

# region: contain-written-for
#: A fingerprint of each hypercorn method this module overrides
#: (``hypercorn_patches.WRITTEN_FOR`` includes them, under its version check).
WRITTEN_FOR = {
    "TCPServer.run": "fd34b021d1a86c98",
    "TCPServer._close": "bc73c4ae25a1ceec",
}
# endregion: contain-written-for

STOCK_TCP_SERVER = TCPServer


# region: contained-connection
class ContainedTCPServer(STOCK_TCP_SERVER):
    """hypercorn's per-connection handler, whose failures end the connection only."""

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as failure:  # not trio.Cancelled: a BaseException
            protocol = getattr(self, "protocol", None)  # set once TLS is done
            client = getattr(protocol, "client", None)
            log.error("a connection from %s failed; closed it, serving on", client, exc_info=failure)
            with trio.CancelScope(shield=True):  # the close must happen, now
                await trio.aclose_forcefully(self.stream)

    async def _close(self) -> None:
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            pass  # a write is under way, maybe stuck: no EOF after it, close
        else:
            try:
                await self.stream.send_eof()
            except (AttributeError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # TLS (trio.SSLStream has no send_eof), or the peer is gone already
            finally:
                self.send_lock.release()
        await self.stream.aclose()


# endregion: contained-connection


def fingerprints() -> dict[str, str]:
    """The installed hypercorn's fingerprints of the methods in :data:`WRITTEN_FOR`."""
    from .hypercorn_patches import _fingerprint  # not at the top: hypercorn_patches imports us

    methods = {"TCPServer.run": STOCK_TCP_SERVER.run, "TCPServer._close": STOCK_TCP_SERVER._close}
    return {name: _fingerprint(method) for name, method in methods.items()}
