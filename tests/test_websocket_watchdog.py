"""Keepalive, dead peers, backpressure and stalled readers on ``/v1/ws/chat``.

What the watchdog (``refimpl/hypercorn_patches.py``) promises (lesson 03; DESIGN §3):

* real clients answer the server's pings on their own, so a ping interval far
  shorter than a silent model's TTFT costs them nothing;
* a peer that answers nothing is dropped after ``ws_ping_timeout``, and its
  generation's trace says ``cancelled(ping_timeout)``;
* a client that stops reading pauses the model (the send blocks); when it
  reads again the answer completes;
* a client that stops reading for ``stall_timeout`` is dropped, and the model
  made at most one message more than the socket took: memory stays flat.

The peers that misbehave are a raw socket speaking ``wsproto``: it can stop
reading, and afterwards read every byte the server left it.  Timeouts here
are short and real (the server shares the test's trio loop and real sockets);
nothing asserts a duration, and waits are on events or on trio's quiescence,
each under a ``fail_after``.  Every client socket is closed on the way out,
pass or fail: a server blocked writing to a peer that neither reads nor
closes would otherwise hang the test's teardown instead of failing it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import trio
import trio.testing
from test_websocket import chat, ended, finish_turn, open_chat, running, turn, ws_url
from trio_websocket import open_websocket_url, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from refimpl.model import count_tokens
from refimpl.protocols.websocket_chat import PATH

BIG = {"ttft_ms": 0, "itl_ms": 0, "tokens": 10**7}  # more than any socket buffer holds


class RawPeer:
    """A WebSocket client that does only what the test tells it to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.partial = ""

    @classmethod
    async def connect(cls, server, rcvbuf: int | None = None, path: str = PATH) -> RawPeer:
        """A peer past the handshake.  ``async with await RawPeer.connect(...)``
        closes its socket on the way out, pass or fail."""
        host, port = server.url.removeprefix("http://").split(":")
        sock = trio.socket.socket()
        try:
            if rcvbuf:  # a small window: the server's send blocks sooner
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((host, int(port)))
            peer = cls(trio.SocketStream(sock))
            await peer.stream.send_all(peer.ws.send(Request(host=host, target=path)))
            with trio.fail_after(10):
                events = []
                while not any(isinstance(e, AcceptConnection) for e in events):
                    events = await peer.read(1)  # one byte at a time: nothing past the handshake
                    assert events != [None], "the server closed the connection during the handshake"
        except BaseException:
            sock.close()
            raise
        return peer

    async def __aenter__(self) -> RawPeer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stream.aclose()

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(text)))

    async def read(self, max_bytes: int = 65536) -> list:
        """Events from one read; ``[None]`` at end of stream."""
        data = await self.stream.receive_some(max_bytes)
        if not data:
            return [None]
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def read_to_the_end(self) -> tuple[list[dict], list]:
        """Every complete message and every other event, until the TCP end."""
        with trio.fail_after(30):
            return await self.read_until(lambda messages, others: False)

    async def read_until(
        self, done: Callable[[list[dict], list], bool], pace: float = 0, max_bytes: int = 65536
    ) -> tuple[list[dict], list]:
        """Complete messages and other events, until ``done(messages,
        others)`` or the TCP end; ``pace``: seconds to wait between reads."""
        messages, others = [], []
        while not done(messages, others) and (events := await self.read(max_bytes)) != [None]:
            for event in events:
                if isinstance(event, TextMessage):
                    self.partial += event.data
                    if event.message_finished:
                        messages.append(json.loads(self.partial))
                        self.partial = ""
                else:
                    others.append(event)
            if pace:
                await trio.sleep(pace)
        return messages, others


# -- keepalive ------------------------------------------------------------------
async def test_real_client_answers_pings_through_a_silent_ttft(start_server):
    server = await start_server(ws_ping_interval=0.02, ws_ping_timeout=2.0)
    async with open_chat(server) as ws:
        _content, done = await turn(ws, simulate={"ttft_ms": 300, "tokens": 3})
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 3


async def test_dead_peer_is_dropped_and_its_generation_cancelled(start_server):
    server = await start_server(ws_ping_interval=0.05, ws_ping_timeout=0.2, stall_timeout=None)
    async with await RawPeer.connect(server) as peer:
        await peer.send(chat(simulate={"ttft_ms": 60_000}))
        gen = await running(server)
        # The peer now reads nothing and so answers no ping: to the server it
        # is a half-open connection.
        event = await ended(gen)
        assert (event.name, event.detail, event.tokens) == ("cancelled", "ping_timeout", 0)
        messages, others = await peer.read_to_the_end()
    # No token, no close frame, and no "cancelled" message either: the route
    # writes nothing more to a connection the watchdog dropped (it would race
    # the socket's closing).
    assert messages == []
    assert any(isinstance(e, Ping) for e in others)  # the pings it ignored
    assert not any(isinstance(e, CloseConnection) for e in others)  # just dropped
    assert not server.engine.active


async def test_idle_peer_that_answers_pings_is_kept(start_server):
    """Pongs are all it takes: a quiet peer that answers is alive."""
    server = await start_server(ws_ping_interval=0.02, ws_ping_timeout=2.0)
    pings, messages = 0, []

    async def serve_pings_until(peer: RawPeer, done) -> None:
        nonlocal pings
        while not done():
            for event in await peer.read():
                assert event is not None, "the server dropped a peer that answered"
                if isinstance(event, Ping):
                    pings += 1
                    await peer.stream.send_all(peer.ws.send(event.response()))
                elif isinstance(event, TextMessage):  # small: one frame each
                    messages.append(json.loads(event.data))

    with trio.fail_after(30):
        async with await RawPeer.connect(server) as peer:
            await serve_pings_until(peer, lambda: pings >= 5)  # many ping timeouts long
            await peer.send(chat())
            await serve_pings_until(peer, lambda: messages and messages[-1]["type"] != "token")
    assert messages[-1]["type"] == "done"


# -- backpressure -------------------------------------------------------------
async def test_client_that_stops_reading_pauses_the_model(server, nursery):
    """trio-websocket with a small socket buffer, not calling get_message."""
    host, port = server.url.removeprefix("http://").split(":")
    tokens = 50_000
    with trio.fail_after(30), trio.socket.socket() as sock:  # closed on the way out
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        ws = await wrap_client_stream(nursery, trio.SocketStream(sock), host, PATH)
        await ws.send_message(chat(simulate={"ttft_ms": 0, "itl_ms": 0, "tokens": tokens}))
        gen = await running(server)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # everyone is stuck
        paused_at = gen.completion_tokens
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert gen.completion_tokens == paused_at < tokens  # the model waits for the socket
        assert gen.trace.names() == ["accepted", "first_token"]  # paused, not ended
        content, done = await finish_turn(ws)  # read again: it carries on
        await ws.aclose()
    assert done["usage"]["completion_tokens"] == tokens == count_tokens(content)
    assert gen.trace.names()[-1] == "done"


async def test_stalled_client_is_dropped_and_memory_stays_flat(start_server):
    server = await start_server(stall_timeout=0.3, ws_ping_interval=None)
    async with await RawPeer.connect(server, rcvbuf=4096) as peer:
        await peer.send(chat(simulate=BIG))
        gen = await running(server)
        event = await ended(gen)  # the peer never reads
        assert (event.name, event.detail) == ("cancelled", "stall_timeout")
        made = gen.completion_tokens
        assert made < BIG["tokens"]
        # Now read what the server managed to send before it gave up.
        messages, _others = await peer.read_to_the_end()
    received = count_tokens("".join(m["content"] for m in messages))
    assert {m["type"] for m in messages} == {"token"}
    # Everything the model made went into the socket, except at most the one
    # message whose write was stuck when the connection was dropped: the
    # server never held more than that.
    batch = server.app.config["REFIMPL"].batch_tokens
    assert made - batch <= received <= made
    assert not server.engine.active


async def test_stalled_real_client_is_dropped(start_server):
    server = await start_server(stall_timeout=0.3, ws_ping_interval=None)
    # If the server never drops us, the close handshake cannot get through
    # the stuck write either: give up on it soon and close the socket.
    async with open_websocket_url(ws_url(server), disconnect_timeout=5) as ws:
        await ws.send_message(chat(simulate=BIG))
        gen = await running(server)
        event = await ended(gen)  # we never call get_message
    assert (event.name, event.detail) == ("cancelled", "stall_timeout")
    assert gen.completion_tokens < BIG["tokens"]


async def test_a_slow_but_steady_reader_is_not_dropped(start_server):
    """Only a write that waits stall_timeout counts, not a long answer."""
    server = await start_server(stall_timeout=0.5)
    async with open_chat(server) as ws:
        _, done = await turn(ws, simulate={"ttft_ms": 0, "itl_ms": 20, "tokens": 30})
    assert done["type"] == "done"
