"""The load generator of ``refimpl bench protocols``: one harness, five protocol clients.

Strategy
--------
Lesson 12 compares protocols, so everything but the protocol must be the
same: one load generator, in a process of its own (as ``bench_client.py``
is for ``refimpl bench``), drives every protocol through an *adapter*, a
small class that opens a connection, runs one streamed chat on it and
hangs up.  The harness (:class:`Harness`) never looks inside: the adapter
yields the content tokens of each read (counted with the server's own
``count_tokens``) as soon as it has parsed it, the harness stamps them with
``time.perf_counter()`` and decides when to leave.
Each adapter is what users of that protocol use:

``sse-h1``   httpx, HTTP/1.1, a connection per stream (what a browser does);
``sse-h2``   httpx ``http2=True`` over h2c (prior knowledge), every stream
             multiplexed on one connection;
``ws``       ``websockets``, ``/v1/ws/chat``, a socket per stream, no
             permessage-deflate (nothing else is compressed either);
``grpc``     grpcio's asyncio API, ``StreamChat``, every call on one channel
             (one HTTP/2 connection; a local subchannel pool, so that a new
             channel is a new connection);
``connect``  httpx, HTTP/1.1, a connection per stream, ``StreamChat`` in
             Connect's envelopes of JSON (connect-es's default format).

Why asyncio, when the server is trio: grpcio's async API runs only on
asyncio, and one event loop for all five is the fair comparison; httpx and
websockets run on it too.  (grpcio is the ``grpc`` extra's, websockets the
``dev`` extra's.)

Hanging up is what each library does when the application stops reading
(the generator's ``aclose``): HTTP/1.1 cannot leave a body half read, so
httpx closes the connection (``sse-h1``, ``connect``); httpcore's HTTP/2
forgets the stream *without* an RST_STREAM, so the server streams on (the
harness then closes the connection, :data:`GRACE` later, and says so);
grpcio's ``cancel()`` resets the stream; the WebSocket sends ``cancel`` and
reads to the turn's end, because its token messages carry no generation id
and only the last message does.

The bench speaks to this process in JSON lines: ``{"ready": PID}`` first,
then per command (``{"phase": NAME, ...}``) maybe some ``{"at": MARK}``
checkpoints, each answered ``{"go": true}`` once the bench has read the
server's clocks, then ``{"result": ...}``; ``{"error": ...}`` if it failed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .backend import count_tokens
from .config import DEFAULT_MODEL
from .sse import SSEParser

MESSAGES = [{"role": "user", "content": "Which streaming protocol should I choose?"}]
WARM = {"tokens": 1, "ttft_ms": 0.0, "itl_ms": 0.0}  # one short stream on every new connection
GRACE = 1.0  # seconds a hang-up may take to reach the trace before the connection is closed
POLL = 0.02  # seconds between two reads of a trace that has not ended yet
#: Every URL here is plain http, so no TLS happens; one context for every
#: httpx client spares each new one the CA bundle (~20 ms, not connection set-up).
NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CONNECT_HEADERS = {"content-type": "application/connect+json", "connect-protocol-version": "1"}


@dataclass
class Run:
    """One stream as the client saw it (``time.perf_counter()`` stamps); the
    adapter fills in ``id`` and ``finished``, the harness the rest."""

    sent: float  # just before the request went out, on an open connection
    stamps: list[float] = field(default_factory=list)  # one per content token, as its read was parsed
    left: float | None = None  # when the client hung up, if it did
    id: str | None = None  # the generation's, once known
    finished: bool = False  # the server ended it (done, or the turn's last message)


# -- the adapters ------------------------------------------------------------------------
class Client:
    """One protocol's client: ``open`` a connection, ``close`` it, and
    ``pieces``, an async generator of the content tokens of each read of one
    stream on it, whose ``aclose()`` hangs up when the stream had not ended."""

    name = transport = hang_up = ""
    multiplexed = False  # every stream on one connection (else a connection per stream)

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> Any:
        raise NotImplementedError

    async def close(self, conn: Any) -> None:
        raise NotImplementedError

    def pieces(self, conn: Any, simulate: dict, run: Run) -> AsyncIterator[int]:
        raise NotImplementedError


class SSE(Client):
    name, transport = "sse-h1", "HTTP/1.1, a connection per stream"
    hang_up = "closes the connection"
    http2 = False

    async def open(self) -> httpx.AsyncClient:  # connects on its first request
        limits, timeout = httpx.Limits(max_connections=1), httpx.Timeout(30, read=None)
        kind = {"http1": not self.http2, "http2": self.http2}
        knobs = {"limits": limits, "timeout": timeout, "verify": NO_TLS, "trust_env": False}
        return httpx.AsyncClient(base_url=self.url, **knobs, **kind)

    async def close(self, client: httpx.AsyncClient) -> None:
        await client.aclose()

    # region: sse-adapter
    async def pieces(self, client: httpx.AsyncClient, simulate: dict, run: Run) -> AsyncIterator[int]:
        """Tokens per read, as they arrive; ``aclose()`` hangs up."""
        body = {"model": DEFAULT_MODEL, "messages": MESSAGES, "stream": True}
        body |= {"stream_options": {"include_usage": True}, "simulate": simulate}
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            run.id = resp.headers.get("x-request-id")
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            parser = SSEParser()
            async for raw in resp.aiter_raw():
                tokens = 0
                for event in parser.feed(raw):
                    if event.type == "error":
                        raise RuntimeError(event.data)
                    if event.data == "[DONE]":
                        run.finished = True
                        continue
                    for choice in json.loads(event.data)["choices"]:
                        tokens += count_tokens(choice["delta"].get("content") or "")
                if tokens:
                    yield tokens

    # endregion: sse-adapter


# region: sse-h2-adapter
class SSE2(SSE):
    name, transport, multiplexed = "sse-h2", "HTTP/2 (h2c), every stream on one connection", True
    hang_up = "forgets the stream (no RST_STREAM)"
    http2 = True


# endregion: sse-h2-adapter


class Connect(SSE):
    name, transport = "connect", "HTTP/1.1, a connection per stream, enveloped JSON"

    async def pieces(self, client: httpx.AsyncClient, simulate: dict, run: Run) -> AsyncIterator[int]:
        sim = {"tokens": simulate["tokens"], "ttftMs": simulate["ttft_ms"], "itlMs": simulate["itl_ms"]}
        ask = json.dumps({"messages": MESSAGES, "simulate": sim}).encode()
        envelope = b"\0" + len(ask).to_bytes(4, "big") + ask  # flags, length, message
        path = "/refimpl.v1.ChatService/StreamChat"
        async with client.stream("POST", path, content=envelope, headers=CONNECT_HEADERS) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            buffer = b""
            async for raw in resp.aiter_raw():
                buffer, tokens = buffer + raw, 0
                while len(buffer) >= 5 and len(buffer) >= 5 + (size := int.from_bytes(buffer[1:5], "big")):
                    flags, message, buffer = buffer[0], json.loads(buffer[5 : 5 + size]), buffer[5 + size :]
                    if flags & 0x02:  # end of stream: an error, if any, is in it
                        if "error" in message:
                            raise RuntimeError(message["error"])
                        run.finished = True
                    run.id = message.get("id", run.id)
                    tokens += count_tokens(message.get("content", ""))
                if tokens:
                    yield tokens


class WebSocket(Client):
    name, transport = "ws", "WebSocket, a socket per stream"
    hang_up = "sends cancel (keeps the socket)"

    async def open(self) -> Any:
        from websockets.asyncio.client import connect

        url = self.url.replace("http://", "ws://", 1) + "/v1/ws/chat"
        return await connect(url, compression=None, proxy=None, max_size=None, ping_interval=None)

    async def close(self, ws: Any) -> None:
        await ws.close()

    # region: ws-adapter
    async def pieces(self, ws: Any, simulate: dict, run: Run) -> AsyncIterator[int]:
        await ws.send(json.dumps({"type": "chat", "messages": MESSAGES, "simulate": simulate}))
        try:
            while (message := json.loads(await ws.recv()))["type"] == "token":
                yield count_tokens(message["content"])
            self._last(message, run)
        finally:
            if not run.finished:  # leaving early: stop the turn, read to its last message (the id)
                await ws.send('{"type":"cancel"}')
                while (message := json.loads(await ws.recv()))["type"] == "token":
                    pass
                self._last(message, run)

    # endregion: ws-adapter

    @staticmethod
    def _last(message: dict, run: Run) -> None:
        run.id, run.finished = message.get("id"), True
        if message["type"] == "error":
            raise RuntimeError(message["error"])


class GRPC(Client):
    name, transport, multiplexed = "grpc", "gRPC (HTTP/2, h2c), every call on one channel", True
    hang_up = "cancels the call (RST_STREAM)"

    async def open(self) -> Any:
        import grpc

        from .v1.chat_pb2_grpc import ChatServiceStub

        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
        channel = grpc.aio.insecure_channel(self.url.removeprefix("http://"), options=options)
        await channel.channel_ready()
        return channel, ChatServiceStub(channel)

    async def close(self, conn: Any) -> None:
        await conn[0].close()

    # region: grpc-adapter
    async def pieces(self, conn: Any, simulate: dict, run: Run) -> AsyncIterator[int]:
        import grpc

        from .v1 import chat_pb2 as pb

        ask = pb.ChatRequest(messages=[pb.Message(**m) for m in MESSAGES], simulate=pb.Simulate(**simulate))
        call = conn[1].StreamChat(ask)
        try:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                run.id = chunk.id
                if chunk.content:
                    yield count_tokens(chunk.content)
            run.finished = True
        finally:
            call.cancel()  # RST_STREAM if it still runs; nothing if it ended

    # endregion: grpc-adapter


PROTOCOLS: dict[str, type[Client]] = {c.name: c for c in (SSE, SSE2, WebSocket, GRPC, Connect)}


# -- the harness ---------------------------------------------------------------------------
# region: run-stream
async def run_stream(
    client: Client, conn: Any, simulate: dict, until: Callable[[Run], Awaitable[bool]] | None = None
) -> Run:
    """One stream, read to its end, or until ``until(run)`` (asked after each read) says leave."""
    run = Run(sent=time.perf_counter())
    pieces = client.pieces(conn, simulate, run)
    try:
        async for tokens in pieces:
            run.stamps += [time.perf_counter()] * tokens  # (one clock read a read)
            if until is not None and await until(run):
                run.left = time.perf_counter()
                break
    finally:
        await pieces.aclose()  # the hang-up, if it had not ended
    return run


# endregion: run-stream


async def at_once(run: Run) -> bool:
    return True


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def ask() -> dict[str, Any] | None:
    line = await asyncio.to_thread(sys.stdin.readline)
    return json.loads(line) if line else None


async def checkpoint(mark: str, **info: Any) -> None:
    """Tell the bench where we are and wait until it has read the server's clocks."""
    say({"at": mark, **info})
    if await ask() != {"go": True}:
        raise RuntimeError(f"the bench did not say go at {mark}")


class Harness:
    """The phases, one method each; each runs one protocol's ``client`` alone."""

    PHASES = frozenset({"warmup", "hold", "release", "paced", "setup", "disconnect", "stall"})

    def __init__(self, url: str) -> None:
        self.debug = httpx.AsyncClient(base_url=url, trust_env=False)  # traces, on a connection of its own
        self.held: list[tuple[Client, list, list[asyncio.Task]]] = []
        self.released = asyncio.Event()

    async def connections(self, client: Client, streams: int, warm: bool = True) -> list[Any]:
        """A connection for each stream, or one for all of them if the
        protocol multiplexes; ``warm``: one short stream has run on each."""
        conns = await asyncio.gather(*(client.open() for _ in range(1 if client.multiplexed else streams)))
        if warm:
            await asyncio.gather(*(run_stream(client, c, WARM) for c in conns))
        return [conns[i % len(conns)] for i in range(streams)]

    async def close(self, client: Client, conns: list[Any]) -> None:
        await asyncio.gather(*(client.close(c) for c in {id(c): c for c in conns}.values()))

    async def warmup(self, client: Client) -> dict:
        await self.close(client, await self.connections(client, 2))
        return {}

    async def paced(self, client: Client, streams: int, simulate: dict) -> dict:
        conns = await self.connections(client, streams)
        await checkpoint("connected")
        cpu = time.process_time()  # every thread of this process (grpcio's too)
        runs = await asyncio.gather(*(run_stream(client, c, simulate) for c in conns), return_exceptions=True)
        cpu = time.process_time() - cpu
        await checkpoint("streamed")  # (the connections are open: the bench reads their byte counts)
        await self.close(client, conns)
        ok = [r for r in runs if isinstance(r, Run)]
        errors = [repr(r) for r in runs if not isinstance(r, Run)]
        errors += [
            f"{len(r.stamps)}/{simulate['tokens']} tokens" for r in ok if len(r.stamps) != simulate["tokens"]
        ]
        return {
            "tokens": sum(len(r.stamps) for r in ok),
            "client_cpu_s": cpu,
            "ttft": [r.stamps[0] - r.sent for r in ok if r.stamps],
            "itl": [b - a for r in ok for a, b in itertools.pairwise(r.stamps)],
            "errors": errors,
        }

    async def hold(self, client: Client, streams: int, simulate: dict) -> dict:
        """``streams`` streams that got their first token and wait: kept open
        until :meth:`release`.  No warm-up streams: the server keeps its
        recent finished generations, which would count as the open ones'."""
        conns, first = await self.connections(client, streams, warm=False), asyncio.Semaphore(0)

        async def wait(run: Run) -> bool:
            first.release()
            await self.released.wait()
            return True  # then hang up

        tasks = [asyncio.create_task(run_stream(client, c, simulate, wait)) for c in conns]
        self.held.append((client, conns, tasks))
        for _ in range(streams):
            await first.acquire()
        await checkpoint("held")
        return {"connections": len({id(c) for c in conns})}

    async def release(self) -> dict:
        self.released.set()
        for client, conns, tasks in self.held:
            await asyncio.gather(*tasks)
            await self.close(client, conns)
        self.held, self.released = [], asyncio.Event()
        return {}

    async def setup(self, client: Client, count: int, fresh: bool) -> dict:
        """``count`` short streams one after another: each on a connection of
        its own (opened, then closed), or all on one warm connection."""
        times = []
        conn = None if fresh else (await self.connections(client, 1))[0]
        await checkpoint("connected")
        for _ in range(count):
            began = time.perf_counter()
            this = await client.open() if fresh else conn
            run = await run_stream(client, this, WARM)
            times.append(run.stamps[0] - (began if fresh else run.sent))
            if fresh:
                await client.close(this)
        await checkpoint("done")
        if conn is not None:
            await client.close(conn)
        return {"first_token": times}

    async def trace(self, gen_id: str, wait: float = GRACE) -> dict:
        """The generation's trace once it has ended, or as it is after ``wait`` seconds."""
        deadline = time.perf_counter() + wait
        while True:
            await asyncio.sleep(POLL)
            trace = (await self.debug.get(f"/v1/debug/generations/{gen_id}")).raise_for_status().json()
            if trace["finished"] or time.perf_counter() > deadline:
                return trace

    async def disconnect(self, client: Client, count: int, simulate: dict) -> dict:
        """``count`` times: a fresh warm connection, a stream, hang up after its first token."""
        samples = []
        for _ in range(count):
            (conn,) = await self.connections(client, 1)
            run = await run_stream(client, conn, simulate, at_once)
            trace = await self.trace(run.id)
            closed = None if trace["finished"] else time.perf_counter()
            await client.close(conn)
            if closed is not None:  # the hang-up did not reach the server: the close must
                trace = await self.trace(run.id, wait=10)
            sample = {"sent": run.sent, "first": run.stamps[0], "left": run.left, "closed": closed}
            samples.append({**sample, "received": len(run.stamps), "events": trace["events"]})
        return {"disconnect": samples}

    async def stall(self, client: Client, simulate: dict) -> dict:
        """A stream whose reader stops after the first token until the bench says go, then hangs up."""
        (conn,) = await self.connections(client, 1)

        async def stop(run: Run) -> bool:
            await checkpoint("stalled", received=len(run.stamps))
            return True

        run = await run_stream(client, conn, simulate, stop)
        await client.close(conn)  # (an HTTP/2 stream's hang-up alone would leave it blocked)
        trace = await self.trace(run.id, wait=10)
        return {"received": len(run.stamps), "events": trace["events"]}


async def serve_commands(url: str) -> None:
    harness = Harness(url)
    async with harness.debug:
        while (command := await ask()) is not None:
            phase = command.pop("phase")
            if phase not in Harness.PHASES:
                raise ValueError(f"no phase {phase!r}")
            if "protocol" in command:  # a fresh adapter per command: none keeps state across them
                command["client"] = PROTOCOLS[command.pop("protocol")](url)
            try:
                result = await getattr(harness, phase)(**command)
            except Exception:
                say({"error": traceback.format_exc()})
                raise
            say({"result": result})


def main() -> None:
    """``python -m refimpl.bench_protocol_clients URL``: take commands until stdin ends."""
    say({"ready": os.getpid()})
    asyncio.run(serve_commands(sys.argv[1]))


if __name__ == "__main__":
    main()
