"""Slow and half-sent requests: a clock per request part, a cap per client address.

Strategy
--------
A server that waits for a client without limit hands every client a free
file descriptor.  RFC 9112 leaves the limits to the server (§9.5: a server
may close a connection it finds too slow; §9.3: it should say so with
``Connection: close``), so refimpl sets three, each a ``refimpl serve`` flag
(lesson 14):

* ``--header-timeout`` (``Config.header_timeout``): from the first byte of a
  request to the end of its headers.  Headers that trickle in (slowloris) get
  a 408 in the OpenAI error shape (``invalid_request_error``, code
  ``request_timeout``: the client's fault, and the openai SDK retries a 408)
  and the connection is closed.  A connection that sends nothing at all is
  hypercorn's ``keep_alive_timeout`` (5 s): closed without a word, since an
  answer to a request nobody sent could be read as the answer to the next one.
* ``--body-timeout`` (``Config.body_timeout``): from the end of the headers to
  the end of the body, for HTTP/1.1.  A body that stops half-way (a short
  ``Content-Length`` body, a chunked body without its last chunk) gets the
  same 408, and the connection closes: the rest of the body would be read as
  the next request.  Only while no response has started: a response on its
  way (a stream of minutes) is the application's business, never cut here.
  Over HTTP/2 the connection carries other streams and must stay: Quart's
  ``BODY_TIMEOUT`` (set from the same setting in ``app.py``) answers the
  stalled stream with the 408 alone.  gRPC, which is not Quart, has no body
  timeout at all: a bidi call's request body *is* the client's half of the
  conversation and lasts as long as the call (its bound is the client's
  deadline, ``grpc-timeout``, and the two caps below).
* ``--max-connections-per-client`` (``Config.max_connections_per_client``):
  connections one client address may hold open at once, counted per TCP
  connection (an HTTP/2 connection with a thousand streams is one).  The next
  one is closed at once, before a byte of it is read.  Not a 429: to answer
  we would have to read a request first (its protocol is unknown until then:
  HTTP/1.1, an HTTP/2 preface, a TLS hello), and reading is exactly what the
  cap is there to refuse; a response written before the request is read is
  lost to the reset our close then causes (RFC 9112 §9.6).  Clients see a
  connection error and retry later, which is what we want.

What hypercorn 0.18 did (measured; lesson 14's table): a stalled
body was answered by Quart's ``BODY_TIMEOUT`` after 60 s, and then the
connection stayed open for good.  The cause: hypercorn closes the socket from
whichever task finished the response -- Quart's -- and the close first tells
Quart the request is over, whereupon Quart cancels that very task, in the
middle of the close.  :class:`TimedH11Protocol` closes shielded.  Trickled
headers were cut by the idle timer after 5 s, silently.

How it is wired.  Nothing refimpl patches elsewhere is touched: hypercorn's
``ProtocolWrapper`` (one per connection, after TLS) becomes
:class:`GuardedConnection`, which counts connections per address, and its
HTTP/1.1 protocol becomes :class:`TimedH11Protocol`, which runs the clock.
The settings ride on hypercorn's config object (:func:`configure`), so each
server in a process has its own; a config without them behaves like stock
hypercorn apart from the two fixes above.  (Over HTTP/2 a client still
uploading after our 408, 404 or 413 took the server down: that fix is
``hypercorn_h2.py``'s.)  :data:`WRITTEN_FOR` fingerprints every hypercorn method
overridden or relied on; ``tests/test_slow_requests.py`` fails when one
changes.  Lesson 14 explains this module.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING

import h11
import hypercorn.protocol as hypercorn_protocol
import hypercorn.trio.tcp_server as hypercorn_tcp
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData, Updated
from hypercorn.events import Event as IOEvent
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol

from .jsonwire import dumps
from .patterns.errors import request_timeout

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

log = logging.getLogger("refimpl")

# region: limits-written-for
WRITTEN_FOR = {
    "version": "0.18.0",
    "ProtocolWrapper.__init__": "df25e181b9e2e64d",
    "ProtocolWrapper.initiate": "a7e8e536ee8669b3",
    "ProtocolWrapper.handle": "b03e2962872c85e8",
    "H11Protocol.handle": "3b56e067447488df",
    "H11Protocol._handle_events": "bd4a76b2837e8722",
    "H11Protocol._maybe_recycle": "3ac53f52bc4e65de",
    "H11Protocol.stream_send": "56a36254a368d71a",
    "TCPServer.run": "fd34b021d1a86c98",
    "TCPServer.protocol_send": "225856426bff7be0",
    "TCPServer._close": "bc73c4ae25a1ceec",
}
# endregion: limits-written-for

STOCK_WRAPPER = ProtocolWrapper
STOCK_H11 = H11Protocol
#: The attribute of hypercorn's config that carries a server's :class:`ConnectionLimits`.
CONFIG_ATTR = "refimpl_limits"
#: Seconds a shielded close may take (a TLS close_notify to a client that
#: does not read could block for ever); then it is forced.
CLOSE_GRACE = 1.0


@dataclass
class ConnectionLimits:
    """One server's limits, and the connections it holds open per address."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections_per_client: int = 256  # 0: no cap
    keep_alive_timeout: float = 20.0
    open: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: int = 0  # connections closed at once for being over the cap
    metrics: Metrics | None = None  # the app's /metrics (app.serve() sets it)

    @classmethod
    def of(cls, config: Config) -> ConnectionLimits:
        return cls(
            config.header_timeout,
            config.body_timeout,
            config.max_connections_per_client,
            config.keep_alive_timeout,
        )

    def admit(self, address: str | None) -> bool:
        if address is None or self.max_connections_per_client <= 0:
            return True
        if self.open[address] >= self.max_connections_per_client:
            self.refused += 1
            if self.metrics is not None:
                self.metrics.refused_connections.inc()
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if not self.open[address]:
            del self.open[address]


def configure(hc: HypercornConfig, limits: ConnectionLimits) -> None:
    """Put ``limits`` on hypercorn's config (``app.hypercorn_config`` does)."""
    setattr(hc, CONFIG_ATTR, limits)
    # A TLS handshake comes before any request and before the cap counts the
    # connection (the cap lives above TLS): give it the header timeout, not
    # hypercorn's 60 s.  hypercorn's read_timeout must stay None: it would
    # end every SSE stream whose client, rightly, sends nothing.
    hc.ssl_handshake_timeout = limits.header_timeout
    # An idle keep-alive connection is closed by the *client* first: a server
    # that closes at the moment a client reuses the connection loses that
    # request (a POST is not retried).  hypercorn's 5 s equals httpx's (and
    # so the openai SDK's) pool expiry, and under load the fault run lost
    # ~1 % of pooled streams to that race; 20 s outlasts httpx's 5 s and
    # Node's 4 s (lesson 14, "timeouts at every hop").
    hc.keep_alive_timeout = limits.keep_alive_timeout


# region: timeout-response
def _timeout_response(part: str, seconds: float) -> bytes:
    """A complete HTTP/1.1 408 (RFC 9112 §4, §9.6 ``Connection: close``),
    written below h11: the request it answers never finished, so h11 has no
    state in which it would send one."""
    body = dumps(request_timeout(part, seconds).body()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


# endregion: timeout-response


# region: request-clock
class TimedH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with a clock on each request part, and a
    close that finishes even when the task closing is being cancelled."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.limits: ConnectionLimits | None = getattr(self.config, CONFIG_ATTR, None)
        self._clock: trio.CancelScope | None = None  # the running clock, if any
        self._timing: str | None = None  # what it times: "headers" or "body"
        self._answered = False  # we sent the 408: nothing of this request follows it

    def _waiting_for(self) -> str | None:
        """The part of a request we are waiting for, if a clock should run."""
        conn = self.connection
        if type(conn) is not h11.Connection:  # a WebSocket: frames, not a request
            return None
        if conn.their_state is h11.IDLE and conn.trailing_data[0]:
            return "headers"  # some bytes of a request, not all its headers
        if conn.their_state is h11.SEND_BODY and conn.our_state is h11.SEND_RESPONSE:
            return "body"  # headers read, body unfinished, no response started
        return None

    async def handle(self, event: IOEvent) -> None:
        try:
            await super().handle(event)
        except (H2CProtocolRequiredError, H2ProtocolAssumedError):
            self._stop()  # HTTP/2 takes over the connection (and the clock)
            raise
        if isinstance(event, Closed):
            self._stop()
        elif self.limits is not None:
            await self._follow()

    async def _follow(self) -> None:
        """After each read: start, keep or stop the clock for what we wait for."""
        part = self._waiting_for()
        if part == self._timing:
            return  # still waiting for the same part: its clock runs on
        self._stop()
        if part is None:
            return
        if part == "headers":
            # hypercorn's idle timer would close this connection silently
            # after keep_alive_timeout, mid-headers: the clock rules now.
            await self.send(Updated(idle=False))
        seconds = self.limits.header_timeout if part == "headers" else self.limits.body_timeout
        self._clock = trio.CancelScope(deadline=trio.current_time() + seconds)
        self._timing = part
        self.task_group.spawn(self._run_clock, self._clock, part, seconds)

    def _stop(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._clock = self._timing = None

    async def _run_clock(self, clock: trio.CancelScope, part: str, seconds: float) -> None:
        with clock:
            await trio.sleep_forever()
        # Stopped (a newer clock, or none) or run out?  And, run out, are we
        # really still waiting for that part (the read that finished it may
        # not have returned yet)?
        if clock is not self._clock or self._waiting_for() != part:
            return
        self._clock = self._timing = None
        self._answered = True
        log.info("408: the request %s did not arrive within %g s from %s", part, seconds, self.client)
        self._count_timeout(part)
        await self.send(RawData(data=_timeout_response(part, seconds)))
        await self.send(Closed())  # the socket closes, then the request's stream hears of it

    async def stream_send(self, event: StreamEvent) -> None:
        # Over HTTP/2 Quart's BODY_TIMEOUT answers a stalled body; over
        # HTTP/1.1 it runs too, from the same moment, and may run out in
        # the same instant as our clock: only one 408 may go out.
        if not self._answered:
            if isinstance(event, Response) and event.status_code == 408:  # Quart's won
                self._count_timeout("body")
            await super().stream_send(event)

    def _count_timeout(self, part: str) -> None:
        """One 408 went out: counted in /metrics (HTTP/2's are counted by app.py)."""
        if self.limits is not None and self.limits.metrics is not None:
            self.limits.metrics.request_timeouts.labels(part=part).inc()

    async def _maybe_recycle(self) -> None:
        # Run when a response ends, in the application's task.  When the
        # request cannot be followed by another (a body left unread, or
        # "Connection: close") hypercorn closes the connection here, and the
        # close tells the application the request is over, whereupon Quart
        # cancels this very task, mid-close: the socket stayed open for good.
        # Shielded, the close finishes; CLOSE_GRACE bounds it.
        with trio.move_on_after(CLOSE_GRACE) as scope:
            scope.shield = True
            await super()._maybe_recycle()
        if self.limits is not None:
            await self._follow()  # a pipelined request may be half here already


# endregion: request-clock


# region: connection-cap
class GuardedConnection(ProtocolWrapper):
    """hypercorn's per-connection protocol switch, counting connections per
    client address."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.limits: ConnectionLimits | None = getattr(self.config, CONFIG_ATTR, None)
        self._address = self.client[0] if self.client else None
        self._counted = False  # this connection holds one of its address's slots

    async def initiate(self) -> None:
        if self.limits is not None:
            if not self.limits.admit(self._address):
                log.info("closed a connection from %s: over --max-connections-per-client", self._address)
                await self.send(Closed())  # closes the socket now; nothing was read
                return
            self._counted = self._address is not None and self.limits.max_connections_per_client > 0
        await super().initiate()

    async def handle(self, event: IOEvent) -> None:
        if isinstance(event, Closed):
            # Every way a connection ends tells its protocol Closed (the peer
            # left, we closed, the idle timer ran out), once or more: free
            # the slot the first time.  (Not a task waiting to free it in a
            # ``finally``: that would be one more task per connection, for
            # the one path Closed misses, a server cancelled at shutdown.)
            if self._counted:
                self._counted = False
                self.limits.release(self._address)
            # A connection we refused (its socket is closed already) has
            # hypercorn's idle timer started after us, and its task would
            # wait for it, up to keep_alive_timeout: stop it.
            await self.send(Updated(idle=False))
        return await super().handle(event)


# endregion: connection-cap


def fingerprints() -> dict[str, str]:
    """The installed hypercorn's version and fingerprints, shaped like :data:`WRITTEN_FOR`."""
    from .hypercorn_patches import _fingerprint  # not at the top: hypercorn_patches imports us

    methods = {
        "ProtocolWrapper.__init__": STOCK_WRAPPER.__init__,
        "ProtocolWrapper.initiate": STOCK_WRAPPER.initiate,
        "ProtocolWrapper.handle": STOCK_WRAPPER.handle,
        "H11Protocol.handle": STOCK_H11.handle,
        "H11Protocol._handle_events": STOCK_H11._handle_events,
        "H11Protocol._maybe_recycle": STOCK_H11._maybe_recycle,
        "H11Protocol.stream_send": STOCK_H11.stream_send,
        "TCPServer.run": hypercorn_tcp.TCPServer.run,
        "TCPServer.protocol_send": hypercorn_tcp.TCPServer.protocol_send,
        "TCPServer._close": hypercorn_tcp.TCPServer._close,
    }
    return {"version": version("hypercorn"), **{name: _fingerprint(f) for name, f in methods.items()}}


# region: limits-install
def install(enabled: bool | None = None) -> None:
    """Make hypercorn build :class:`GuardedConnection` and :class:`TimedH11Protocol`
    (``hypercorn_patches.install()`` calls this).  Idempotent; refuses,
    changing nothing, if hypercorn no longer builds the classes we replace;
    warns if a fingerprint differs.  ``enabled=None`` reads
    ``REFIMPL_LIMITS`` (``0``: hypercorn's own classes, for measuring)."""
    if hypercorn_tcp.ProtocolWrapper not in (STOCK_WRAPPER, GuardedConnection) or (
        hypercorn_protocol.H11Protocol not in (STOCK_H11, TimedH11Protocol)
    ):
        raise RuntimeError("hypercorn no longer creates the classes refimpl patches; see hypercorn_limits.py")
    found = fingerprints()
    if found != WRITTEN_FOR:
        changed = sorted(k for k in WRITTEN_FOR if found.get(k) != WRITTEN_FOR[k])
        log.warning(
            "hypercorn changed under refimpl/hypercorn_limits.py (%s): re-read it", ", ".join(changed)
        )
    if enabled is None:
        enabled = os.environ.get("REFIMPL_LIMITS", "1") != "0"
    # TCPServer.run builds each connection's ProtocolWrapper; ProtocolWrapper
    # its H11Protocol (HTTP/2's class is hypercorn_h2.py's).
    hypercorn_tcp.ProtocolWrapper = GuardedConnection if enabled else STOCK_WRAPPER
    hypercorn_protocol.H11Protocol = TimedH11Protocol if enabled else STOCK_H11


# endregion: limits-install
