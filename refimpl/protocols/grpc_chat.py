"""``refimpl.v1.ChatService``: the chat over gRPC, Connect and gRPC-Web, same port.

Strategy
--------
gRPC is HTTP/2 underneath (the "gRPC over HTTP2" protocol document): a call
is one HTTP/2 stream, each message a 5-byte prefix (a compression flag and a
length) and a protobuf, and the outcome comes last, in *trailers*
(``grpc-status``, ``grpc-message``).  A server stream is therefore an SSE
stream with binary framing and a status at the end instead of ``[DONE]``.
The service is ``proto/refimpl/v1/chat.proto``; ``make proto`` generates the
code under ``refimpl/v1/`` (lesson 05).

**Who speaks it.**  ``connectrpc`` (the Connect project's Python runtime) is
an ASGI app that answers three wire protocols on the same paths: gRPC (what a
stock ``grpcio`` client speaks; HTTP/2 only, because of the trailers),
gRPC-Web (trailers moved into the body, for browsers and HTTP/1.1), and
Connect (plain HTTP: a server stream is a POST whose body is a sequence of
enveloped JSON or protobuf messages, so a browser reads it with ``fetch``).
:func:`asgi` puts it in front of the Quart app on hypercorn: one port, one
server, every protocol (DESIGN §2).

**The same engine, the same patterns.**  ``StreamChat`` is the pull loop of
``sse_chat.stream_chunks`` with protobuf chunks; ``Chat`` is the
``ChatSocket`` of ``websocket_chat.py`` (a reader task and at most one writer
per call, a ``cancel`` message stops the turn, an error ends the turn, not
the call).  Requests are validated by ``chat_request.py`` (the protobuf is
turned into the JSON body it stands for), so a bad value gets the same
message and ``param`` as over HTTP; errors are ``patterns/errors.py``'s
:func:`~refimpl.patterns.errors.grpc_error`.

**Cancellation** (lesson 09).  A grpcio client that cancels, or whose
deadline passes, resets its HTTP/2 stream (RST_STREAM, RFC 9113 §6.4).
hypercorn turns that into an ASGI ``http.disconnect``, but connectrpc looks at
its request only when it needs the next message, so a server stream would
learn of it at its next write at best.  :func:`_cancel_on_disconnect` reads
the ASGI messages itself and cancels the handler the moment the disconnect
arrives.  The reason in the trace is ``deadline`` when the call's deadline
(``grpc-timeout``) has passed, within the network's delay, else
``client_cancel``: HTTP/2 says only "this stream was reset".

**Heartbeats** (lesson 08).  HTTP/2 has PING frames (RFC 9113 §6.7), and
grpcio clients send them (``grpc.keepalive_time_ms``, gRFC A8), which
hypercorn answers at once; an unanswered one tells the *client* its
connection is dead.  But a PING belongs to one hop: behind nginx it ends at
nginx, and ``grpc_read_timeout`` (60 s by default) cuts a call whose
*upstream* stays silent however often the client pings
(``tests/test_nginx.py``).  So a silent call needs bytes of its own, as SSE
needs ``: ping``: after ``--heartbeat`` seconds with nothing sent, the
writer sends a chunk with only the id (``heartbeat.grpc_heartbeat``).
And the first message goes out at once, with only the id, like SSE's role
chunk: connectrpc sends the response headers with the first message, and
nginx, while it waits for headers, restarts its timer for nothing else.
Readers skip chunks without content, as SSE readers skip comments.

A client that stops reading is the stall guard's (``--stall-timeout``): the
watchdog is put in the scope here as ``sse_chat`` does, and it drops a
Connect or gRPC-Web call over HTTP/1.1 whose write waits that long.  Over
HTTP/2 a stalled call waits for its flow-control window instead, its model
paused (``hypercorn_h2.py``), and the watchdog, which lives in hypercorn's
HTTP/1.1 protocol, does not see it: such a call lasts until the client
resets it or closes the connection (lesson 06).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import auth, hypercorn_patches
from ..backend import ModelError
from ..config import Config
from ..engine import FINISHED, SILENT, Engine, Generation, GenerationCancelled, Idle
from ..patterns import backpressure, cancellation, errors, heartbeat
from ..patterns.errors import APIError
from ..patterns.shutdown import Shutdown
from ..v1 import chat_pb2 as pb
from ..v1.chat_connect import ChatServiceASGIApplication
from .chat_request import ChatParams, parse_chat_request

log = logging.getLogger("refimpl")
PROTOCOL = "grpc"  # the trace's protocol name (gRPC, gRPC-Web and Connect alike)
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
#: A reset this close to the call's deadline is the deadline: the client's
#: timer and ours run apart by the network's delay.
DEADLINE_SLACK = 0.05


@dataclass
class Call:
    """What the ASGI wrapper knows about one call, for the handler."""

    deadline: float | None = None  # trio time; from grpc-timeout / connect-timeout-ms
    gens: list[Generation] = field(default_factory=list)

    def left_reason(self) -> str:
        if self.deadline is not None and trio.current_time() >= self.deadline - DEADLINE_SLACK:
            return "deadline"
        return "client_cancel"


_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("refimpl_grpc_call")


def chat_params(request: pb.ChatRequest, config: Config) -> ChatParams:
    """The JSON body this request stands for, validated like any other."""
    body: dict[str, Any] = {
        "model": request.model or config.model_name,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": True,
        "stop": list(request.stop) or None,
        "backpressure": request.backpressure or None,
        "simulate": {f.name: value for f, value in request.simulate.ListFields()},
    }
    for name in ("max_tokens", "seed", "temperature"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    return parse_chat_request(body, served_model=config.model_name, defaults=config.simulate)


def usage(gen: Generation) -> pb.Usage:
    return pb.Usage(**gen.usage())


def chunk(gen: Generation, step: list[str] | Idle) -> pb.ChatChunk:
    """What both writers send for a pull: the ready tokens as one chunk, or
    a heartbeat (an id-only chunk) when the pull said ``SILENT`` (lesson 08)."""
    if step is SILENT:
        return heartbeat.grpc_heartbeat(gen)
    return pb.ChatChunk(id=gen.id, content="".join(step))


def error_message(err: ModelError | APIError, gen_id: str = "") -> pb.ServerMessage:
    """``Chat``'s error message: the OpenAI error object, as the WebSocket's."""
    fields = errors.error_object(err)
    return pb.ServerMessage(error=pb.Error(id=gen_id, **{k: v or "" for k, v in fields.items()}))


class ChatService:
    """The two RPCs of ``chat.proto``; connectrpc calls them."""

    def __init__(self, engine: Engine, config: Config, shutdown: Shutdown) -> None:
        self.engine = engine
        self.config = config
        self.shutdown = shutdown
        self.nursery: trio.Nursery | None = None  # the app's; set by asgi()

    def start(self, request: pb.ChatRequest) -> tuple[Generation, str | None]:
        """A generation for ``request``; :class:`APIError` for a bad one, or
        when the engine refuses (429 queue full, 503 shutting down)."""
        params = chat_params(request, self.config)
        gen = self.engine.start(params.model_request, PROTOCOL)
        _CALL.get().gens.append(gen)
        return gen, params.backpressure

    # region: grpc-stream
    async def stream_chat(self, request: pb.ChatRequest, ctx: Any) -> AsyncIterator[pb.ChatChunk]:
        try:
            gen, policy = self.start(request)
        except APIError as err:  # before the stream: a status and no message
            raise errors.grpc_error(err) from None
        ctx.response_headers["x-request-id"] = gen.id
        flow = backpressure.flow(gen, policy, self.config, self.nursery)
        batch, silence = self.config.batch_tokens, self.config.heartbeat
        try:
            yield pb.ChatChunk(id=gen.id)  # the headers leave now, with the id (above)
            while (step := await flow.pull(batch, timeout=silence)) is not FINISHED:
                yield chunk(gen, step)  # blocks if they stop reading
            yield pb.ChatChunk(id=gen.id, finish_reason=gen.finish_reason, usage=usage(gen))
        except ModelError as err:  # lesson 07: a status in the trailers, not a cut stream
            raise errors.grpc_error(err, gen.id) from None
        except GenerationCancelled as cancel:  # the server cancelled it (shutdown)
            raise errors.grpc_error(errors.cancelled_error(cancel.reason), gen.id) from None
        except Exception as bug:  # a bug of ours: INTERNAL, logged
            raise errors.grpc_error(gen.fail(bug), gen.id) from None
        finally:
            cancellation.client_left(gen, _CALL.get().left_reason())  # lesson 09
            flow.close()

    # endregion: grpc-stream

    async def chat(
        self, requests: AsyncIterator[pb.ClientMessage], ctx: Any
    ) -> AsyncIterator[pb.ServerMessage]:
        call = ChatCall(self, requests)
        self.shutdown.track(call, call.going_away)
        try:
            async with call.run() as messages:
                async for message in messages:
                    yield message
        finally:
            self.shutdown.untrack(call)
        if call.closing == "shutdown":
            raise errors.grpc_error(errors.cancelled_error("shutdown"))


class ChatCall:
    """One bidi ``Chat`` call: the twin of ``websocket_chat.ChatSocket``."""

    def __init__(self, service: ChatService, requests: AsyncIterator[pb.ClientMessage]) -> None:
        self.service = service
        self.requests = requests
        self.gen: Generation | None = None  # the running turn's generation, if any
        self.closing: str | None = None
        self.nursery: trio.Nursery | None = None
        self.send: trio.MemorySendChannel[pb.ServerMessage] | None = None

    def going_away(self) -> None:
        self.closing = "shutdown"
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    # region: grpc-session
    @trio.as_safe_channel
    async def run(self) -> AsyncIterator[pb.ServerMessage]:
        # A generator may not keep a nursery open across its yields (DESIGN
        # §4); as_safe_channel runs this one in a task of its own.
        self.send, outbox = trio.open_memory_channel[pb.ServerMessage](0)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.closing == "shutdown":
                nursery.cancel_scope.cancel()
            nursery.start_soon(self.read_messages)
            async for message in outbox:  # closed when the reader and the writer are done
                yield message

    async def read_messages(self) -> None:
        async with self.send:  # the client half-closed: the running turn ends, then the call
            async for message in self.requests:  # cancelled when the client goes away
                if message.WhichOneof("kind") == "cancel":
                    if self.gen is not None:
                        self.gen.cancel("client_cancel")  # stops the model now
                elif self.gen is not None:
                    err = APIError(
                        400,
                        "A generation is already running on this call: wait for its end or send a cancel first.",
                        code="generation_in_progress",
                    )
                    await self.send.send(error_message(err))
                else:
                    try:
                        self.gen, policy = self.service.start(message.chat)
                    except APIError as err:  # a bad request: say so, carry on
                        await self.send.send(error_message(err))
                        continue
                    self.nursery.start_soon(self.stream, self.gen, policy, self.send.clone())

    # endregion: grpc-session

    # region: grpc-turn
    async def stream(self, gen: Generation, policy: str | None, send: trio.MemorySendChannel) -> None:
        service = self.service
        flow = backpressure.flow(gen, policy, service.config, service.nursery)
        batch, silence = service.config.batch_tokens, service.config.heartbeat
        async with send:
            try:
                try:
                    while (step := await flow.pull(batch, timeout=silence)) is not FINISHED:
                        await send.send(pb.ServerMessage(token=chunk(gen, step)))
                    last = pb.ServerMessage(
                        done=pb.Done(id=gen.id, finish_reason=gen.finish_reason, usage=usage(gen))
                    )
                except ModelError as err:  # an error message; the call stays
                    last = error_message(err, gen.id)
                except GenerationCancelled as cancel:  # a cancel message, or the server's
                    last = pb.ServerMessage(
                        cancelled=pb.Cancelled(id=gen.id, reason=cancel.reason, usage=usage(gen))
                    )
                except Exception as bug:  # a bug of ours: an error message, not a cut turn
                    last = error_message(gen.fail(bug), gen.id)
                self.gen = None  # over before the client hears it, as on the WebSocket
                await send.send(last)
            finally:
                if self.gen is gen:
                    self.gen = None
                cancellation.client_left(gen, self.closing or _CALL.get().left_reason())
                flow.close()

    # endregion: grpc-turn


# region: cancel-on-disconnect
async def _cancel_on_disconnect(app: ASGIApp, scope: dict, receive: Callable, send: Callable) -> None:
    """Run a connectrpc call, cancelling it the moment its client is gone.

    We read the ASGI messages ourselves and hand connectrpc the request
    messages through a channel; an ``http.disconnect`` (the stream was reset:
    cancel, deadline, or the connection closed) cancels the handler at once."""
    to_app, from_client = trio.open_memory_channel[dict](1)

    async def pump(handler: trio.CancelScope) -> None:
        async with to_app:
            while (message := await receive())["type"] != "http.disconnect":
                await to_app.send(message)
        handler.cancel()

    async def app_receive() -> dict:
        try:
            return await from_client.receive()
        except trio.EndOfChannel:
            return {"type": "http.disconnect"}

    with trio.CancelScope() as handler:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, handler)
            await app(scope, app_receive, send)
            nursery.cancel_scope.cancel()


# endregion: cancel-on-disconnect


def _deadline(scope: dict) -> float | None:
    """The call's deadline from ``grpc-timeout`` (gRPC: a number and a unit)
    or ``connect-timeout-ms`` (Connect), as a trio time."""
    units = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
    for name, value in scope["headers"]:
        if name == b"grpc-timeout" and value[-1:] in units and value[:-1].isdigit():
            return trio.current_time() + int(value[:-1]) * units[value[-1:]]
        if name == b"connect-timeout-ms" and value.isdigit():
            return trio.current_time() + int(value) / 1000
    return None


def asgi(quart_app: Any, engine: Engine, config: Config, shutdown: Shutdown) -> ASGIApp:
    """One ASGI app for hypercorn: ``/refimpl.v1.ChatService/*`` to
    connectrpc, everything else (and the lifespan) to Quart."""
    service = ChatService(engine, config, shutdown)
    # API keys (auth.py): checked before the request message is even read.
    keys = auth.Keys(config.api_keys)
    connect_app = ChatServiceASGIApplication(
        service, interceptors=[auth.GrpcKeyCheck(keys)] if keys.required else []
    )
    prefix = connect_app.path + "/"

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(prefix):
            return await quart_app(scope, receive, send)
        service.nursery = quart_app.nursery  # coalesce's producer lives there (DESIGN §4)
        call = Call(deadline=_deadline(scope))
        watchdog = hypercorn_patches.Watchdog(ping_interval=None, stall_timeout=config.stall_timeout)
        watchdog.on_drop = lambda reason: [cancellation.client_left(g, reason) for g in call.gens]
        scope[hypercorn_patches.SCOPE_KEY] = watchdog
        token = _CALL.set(call)
        try:
            await _cancel_on_disconnect(connect_app, scope, receive, send)
        finally:
            _CALL.reset(token)

    return app
