"""``/v1/ws/chat``: chat over one WebSocket, many turns, with cancel and errors.

Strategy
--------
A WebSocket (RFC 6455) is one TCP connection carrying messages both ways, for
as long as both sides like.  That is what SSE cannot give: the client can
*talk while the server streams*, to say "stop" without hanging up, and can
ask again on the same socket without a new handshake.  The message schema is
in ``ws_messages.py``; this module is the shell that moves those messages.

One :class:`ChatSocket` per connection runs two kinds of task in a nursery
(a WebSocket handler is a plain coroutine, not a response generator, so a
nursery is fine here; DESIGN §4):

* the **reader** (:meth:`ChatSocket.read_messages`) reads every message as it
  arrives, even while tokens are streaming out.  That is the whole difference
  from the loop people usually write (lesson 03 runs it:
  ``examples/seed_ws.py``), which reads one request and then only writes until
  the answer is finished, so a ``cancel`` waits unread until it is too late.
* the **writer** (:meth:`ChatSocket.stream`), one per generation, pulls tokens
  from the :class:`~refimpl.engine.Generation` and sends them.  It pulls only
  after the previous send finished, so a client that stops reading stops the
  model (backpressure, lesson 10) and nothing piles up in memory.

One generation at a time per socket.  A second ``chat`` while one runs gets
an ``error`` (``generation_in_progress``) and the running one carries on: we
do not queue it, because a queue would be a hidden buffer with no bound that
a client cannot see or cancel; a client that wants a new answer sends
``cancel`` first (or opens a second socket).

Every way a turn can end is written down in the trace: ``done``;
``error(code)`` when the model fails, or when the writer itself has a bug
(``internal_error``, logged with its traceback; the socket stays usable);
``cancelled(client_cancel)`` for a cancel message; and when the connection
goes away mid-generation, ``cancelled(client_disconnect)`` (the client closed
it), ``cancelled(protocol_error)`` (we closed it: 1003 for a binary frame),
``cancelled(internal_error)`` (a bug in the reader: 1011, logged), or the
watchdog's ``ping_timeout`` / ``stall_timeout`` / ``message_too_big``
(the watchdog in ``hypercorn_patches.py``: keepalive pings, dead peers,
stalled readers and the size limit are handled below ASGI, where the frames
and the socket are).  The error cases themselves live in ``patterns/``: the
error message in ``errors.py`` beside the SSE error event, the ping in
``heartbeat.py`` beside the SSE comment.
"""

from __future__ import annotations

import logging

import trio
from quart import Quart, websocket
from quart.wrappers import Websocket
from wsproto.frame_protocol import CloseReason

from .. import auth, hypercorn_patches
from ..backend import ModelError
from ..config import Config
from ..engine import FINISHED, Engine, Generation, GenerationCancelled
from ..patterns import backpressure, cancellation, errors
from ..patterns.errors import APIError
from ..patterns.shutdown import Shutdown
from .ws_messages import (
    Cancel,
    ProtocolViolation,
    cancelled_message,
    done_message,
    parse_client_message,
    token_message,
)

PATH = "/v1/ws/chat"
log = logging.getLogger("refimpl")
PROTOCOL = "websocket"  # the trace's protocol name


class ChatSocket:
    """One client connection: a reader task and at most one writer task."""

    def __init__(
        self, ws: Websocket, engine: Engine, config: Config, watchdog: hypercorn_patches.Watchdog
    ) -> None:
        self.ws = ws
        self.engine = engine
        self.config = config
        self.watchdog = watchdog
        self.gen: Generation | None = None  # the running generation, if any
        self.closing: str | None = None  # why *we* are closing the socket
        self.close_with: tuple[int, str] | None = None  # the close code and reason
        self.nursery: trio.Nursery | None = None

    # region: ws-session
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.closing == "shutdown":  # the drain came before we started
                nursery.cancel_scope.cancel()
            try:
                violation = await self.read_messages()  # returns only on a violation
                self.closing, self.close_with = "protocol_error", (violation.code, violation.reason)
            except Exception:  # a bug of ours: say so (1011), not with a silent 1000
                log.exception("unexpected error in %s", PATH)
                self.closing = "internal_error"
                self.close_with = (CloseReason.INTERNAL_ERROR, "internal error")
            nursery.cancel_scope.cancel()  # stop the writer before we close
        await self.ws.close(*self.close_with)

    def going_away(self) -> None:
        """Server shutdown (``patterns/shutdown.py``): stop the turn, if any,
        and close with 1001, "going away" (RFC 6455 §7.4.1)."""
        self.closing, self.close_with = "shutdown", (CloseReason.GOING_AWAY, "server shutting down")
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def read_messages(self) -> ProtocolViolation:
        while True:
            data = await self.ws.receive()  # cancelled when the client goes away
            try:
                message = parse_client_message(
                    data, model=self.config.model_name, defaults=self.config.simulate
                )
                if isinstance(message, Cancel):
                    if self.gen is not None:
                        self.gen.cancel("client_cancel")  # stops the model now
                elif self.gen is not None:
                    raise APIError(
                        400,
                        "A generation is already running on this socket: wait for its"
                        ' end or send {"type":"cancel"} first.',
                        code="generation_in_progress",
                    )
                else:
                    self.gen = self.engine.start(message.request, PROTOCOL)
                    self.nursery.start_soon(self.stream, self.gen, message.backpressure)
            except ProtocolViolation as violation:
                return violation
            except APIError as err:  # a bad message (or 429/503): say so, carry on
                await self.ws.send(errors.ws_error_message(err))

    # endregion: ws-session

    # region: ws-stream
    async def stream(self, gen: Generation, policy: str | None) -> None:
        flow = backpressure.flow(gen, policy, self.config, self.nursery)
        try:
            try:
                batch = self.config.batch_tokens
                # No heartbeat timeout here: the watchdog pings (lesson 08).
                while (step := await flow.pull(batch)) is not FINISHED:
                    await self.ws.send(token_message(step))  # blocks if they stop reading
                last = done_message(gen)
            except backpressure.SlowConsumer as err:  # lesson 10: say why, then close
                last = errors.ws_error_message(err, gen.id)
                self.closing, self.close_with = (
                    "slow_consumer",
                    (CloseReason.POLICY_VIOLATION, "slow consumer"),
                )
            except ModelError as err:  # lesson 07: an error message, the socket stays
                last = errors.ws_error_message(err, gen.id)
            except GenerationCancelled as cancel:  # a cancel message, or the server's
                last = cancelled_message(gen, cancel.reason)
            except Exception as bug:  # a bug of ours: an error message, not a cut turn
                last = errors.ws_error_message(gen.fail(bug), gen.id)
            # The turn is over (the trace says so) before the client can hear
            # it, so a chat sent the moment it does is not "in progress".
            self.gen = None
            if self.watchdog.dropped is None:  # a dropped peer hears nothing more
                await self.ws.send(last)
            if self.closing == "slow_consumer":
                self.nursery.cancel_scope.cancel()  # run() closes the socket
        finally:
            if self.gen is gen:
                self.gen = None
            # Still running: the socket went away mid-generation (lesson 09).
            cancellation.client_left(gen, self.closing or self.watchdog.dropped)
            flow.close()

    # endregion: ws-stream


def register(app: Quart, engine: Engine, shutdown: Shutdown) -> None:
    config: Config = app.config["REFIMPL"]
    keys = auth.Keys(config.api_keys)

    @app.websocket(PATH)
    async def ws_chat() -> None:
        ws = websocket._get_current_object()
        # The watchdog reads its settings from the scope when we accept.
        watchdog = hypercorn_patches.Watchdog(
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
            stall_timeout=config.stall_timeout,
            max_message_bytes=config.ws_max_message_bytes,
        )
        ws.scope[hypercorn_patches.SCOPE_KEY] = watchdog
        chat = ChatSocket(ws, engine, config, watchdog)
        # Each ping is a heartbeat of the running generation, if any (lesson
        # 08); a dropped connection cancels it at once (lesson 09).
        watchdog.on_ping = lambda: chat.gen.heartbeat() if chat.gen is not None else None
        watchdog.on_drop = lambda reason: chat.gen and cancellation.client_left(chat.gen, reason)
        # A browser that sends its key as a subprotocol token gets the other
        # subprotocol it offered; a socket without a good key is told why
        # (1008) once it is open, where a browser can read it (auth.py).
        await ws.accept(subprotocol=auth.chosen_subprotocol(ws.requested_subprotocols))
        presented = auth.websocket_key(ws.headers, ws.query_string, ws.requested_subprotocols)
        if not keys.allows(presented):
            return await ws.close(CloseReason.POLICY_VIOLATION, auth.websocket_refusal(presented))
        shutdown.track(chat, chat.going_away)  # closed with 1001 when the server drains
        try:
            await chat.run()
        finally:
            shutdown.untrack(chat)
