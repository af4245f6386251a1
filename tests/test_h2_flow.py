"""HTTP/2 flow control: a stream whose window is never reopened pauses its
own model, and only its own (h2c, a raw `h2` client on a real socket).

On one HTTP/2 connection each stream has its own flow-control window (RFC
9113 §5.2).  Our client gives the bytes of a *held* stream back only at the
connection level (so the connection's window stays open for its siblings)
and never to the stream itself; every other stream it reads normally.  The
server must then stop writing the held stream once its window is spent,
which in the pull design means its model stops too (lesson 10: nothing
buffered, so nothing grows), while its sibling runs to its end on the same
connection.  Had hypercorn buffered the writes past the window, the writer
would never block and the model would run on: stock hypercorn 0.18 made
1,000,000 tokens for 293 bytes sent (``refimpl/hypercorn_h2.py`` explains
why, and is the fix).  So these tests count the held generation's tokens,
and look at what hypercorn holds for the stream.  When the client at last
reopens the window (WINDOW_UPDATE, §6.9), the stream resumes and arrives
whole; one that the client resets or leaves frees its writer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hypercorn.protocol as hypercorn_protocol
import pytest
import trio
import trio.testing
from conftest import Server, chat_body
from test_fastwrite import expected_tokens

from refimpl.hypercorn_h2 import MOST_HELD
from refimpl.model import count_tokens
from refimpl.sse import SSEParser
from refimpl.v1 import chat_pb2 as pb

A, B = 1, 3  # the held stream and its sibling (a client's streams are odd, RFC 9113 §5.1.1)
A_TOKENS = 1_000_000  # "forever" at itl 0, unless something stops it
B_TOKENS = 2_000
#: What A may make at most: its 65,535-byte window holds a few hundred
#: chunks, and hypercorn's buffer (below MOST_HELD bytes) a few hundred more.
A_BOUND = 2_000
FAST = {"ttft_ms": 0, "itl_ms": 0}


class H2Client:
    """A raw ``h2`` client on a real socket.  It reads every stream and
    gives the bytes back at once (WINDOW_UPDATE), except those of a *held*
    stream: for them it opens the connection's window only, so the stream's
    own window, once spent, stays closed until :meth:`reopen`."""

    def __init__(self, sock: trio.SocketStream, authority: str, window: int | None) -> None:
        self.sock, self.authority = sock, authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        if window is not None:  # each stream's window starts at this (RFC 9113 §6.9.2) ...
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.conn.initiate_connection()
        if window is not None:  # ... and the connection's is raised to it
            self.conn.increment_flow_control_window(window - self.conn.inbound_flow_control_window)
        self.held: dict[int, int] = {}  # held stream: bytes not given back to it yet
        self.ids: dict[int, str] = {}  # stream: its generation's id (X-Request-Id)
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def request(self, stream_id: int, body: dict[str, Any], *, hold: bool = False) -> None:
        data = json.dumps(body).encode()
        headers = [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":scheme", "http"),
            (":authority", self.authority),
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, data, end_stream=True)
        self.bodies[stream_id] = b""
        if hold:
            self.held[stream_id] = 0

    def grpc_request(self, stream_id: int, request: pb.ChatRequest, *, hold: bool = False) -> None:
        """A gRPC ``StreamChat`` by hand: one length-prefixed message, then
        the end of the request (lesson 05)."""
        message = request.SerializeToString()
        headers = [
            (":method", "POST"),
            (":path", "/refimpl.v1.ChatService/StreamChat"),
            (":scheme", "http"),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
        self.bodies[stream_id] = b""
        if hold:
            self.held[stream_id] = 0

    async def until(self, done: Callable[[], bool]) -> None:
        """Send what is pending, then read and answer until ``done()``."""
        await self.sock.send_all(self.conn.data_to_send())
        while not done():
            data = await self.sock.receive_some(65536)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                assert not isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated), event
                if isinstance(event, h2.events.ResponseReceived):
                    self.ids[event.stream_id] = dict(event.headers)[b"x-request-id"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    n = event.flow_controlled_length
                    if event.stream_id in self.held:
                        self.held[event.stream_id] += n
                        self.conn.increment_flow_control_window(n)  # the connection only
                    else:
                        self.conn.acknowledge_received_data(n, event.stream_id)  # both
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
            await self.sock.send_all(self.conn.data_to_send())

    def reopen(self, stream_id: int) -> None:
        """Give a held stream its bytes back (the next ``until`` sends the
        WINDOW_UPDATE), and read it normally from now on."""
        self.conn.increment_flow_control_window(self.held.pop(stream_id), stream_id=stream_id)

    async def hold_a_until_b_ends(self) -> None:
        """Read B to its end, and A until its window is spent: then every
        byte of A the server sent is here, none on the way."""
        window = self.conn.remote_settings.initial_window_size
        with trio.fail_after(30):
            await self.until(lambda: B in self.ended and len(self.bodies[A]) == window)
        assert self.bodies[B].rstrip().endswith(b"data: [DONE]")  # the sibling ran to its end


@asynccontextmanager
async def connect(server: Server, window: int | None = None) -> AsyncIterator[H2Client]:
    authority = server.url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        yield H2Client(sock, authority, window)


def record_connections(monkeypatch) -> list[hypercorn_protocol.H2Protocol]:
    """Every HTTP/2 connection the server makes from now on, to look at the
    buffer hypercorn keeps per stream.  Call it once the server runs:
    starting a server installs the patches, which want hypercorn's names."""
    made = []

    class Recorded(hypercorn_protocol.H2Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(hypercorn_protocol, "H2Protocol", Recorded)
    return made


async def standing_still(server: Server, gen_id: str) -> int:
    """The tokens a generation has made, once the server has nothing left
    to do, after checking that it stays there while nobody reads."""
    gen = server.engine.get(gen_id)
    await trio.testing.wait_all_tasks_blocked()
    made = gen.completion_tokens
    await trio.testing.wait_all_tasks_blocked()
    assert gen.completion_tokens == made and not gen.finished, (made, gen.finished)
    return made


def text_of(body: bytes) -> str:
    """The text of the whole SSE events in ``body``: all of a stream, or
    its first bytes."""
    chunks = [json.loads(e.data) for e in SSEParser().feed(body) if e.data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def tokens_written(client: H2Client, h2c: hypercorn_protocol.H2Protocol) -> int:
    """How many of A's tokens its writer has written: they are in the
    client's hands or in hypercorn's buffer, which continues those bytes."""
    text = text_of(client.bodies[A] + bytes(h2c.stream_buffers[A].buffer))
    n = count_tokens(text)
    assert text == "".join(expected_tokens(n))  # whole and in order
    return n


def stream_body(content: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return chat_body(content, stream=True, simulate={**FAST, "tokens": tokens}, **extra)


def answer_body(tokens: int) -> dict[str, Any]:
    """A non-streamed answer: one JSON body, written in one go."""
    return chat_body("Hello", simulate={**FAST, "tokens": tokens})


async def test_a_closed_window_pauses_its_own_stream_only(server, monkeypatch):
    connections = record_connections(monkeypatch)
    async with connect(server) as client:
        client.request(A, stream_body("Hello", A_TOKENS), hold=True)
        client.request(B, stream_body("B", B_TOKENS))
        await client.hold_a_until_b_ends()
        made = await standing_still(server, client.ids[A])
        assert made < A_BOUND  # A's model stood still
        (h2c,) = connections
        assert len(h2c.stream_buffers[A].buffer) < MOST_HELD  # nothing piled up for it
        assert tokens_written(client, h2c) == made  # and every token it made went out or is there


async def test_coalesce_runs_ahead_to_its_cap_and_no_further(start_server, monkeypatch):
    """``coalesce`` lets the model go on while the client does not read, but
    only up to ``--coalesce-max-tokens`` ahead (``patterns/backpressure.py``).
    That needs a blocked write too, or its writer would take the pending
    tokens as fast as they came, and the model would never stop."""
    cap = 500
    server = await start_server(coalesce_max_tokens=cap)
    connections = record_connections(monkeypatch)
    async with connect(server) as client:
        client.request(A, stream_body("Hello", A_TOKENS, backpressure="coalesce"), hold=True)
        client.request(B, stream_body("B", B_TOKENS))
        await client.hold_a_until_b_ends()
        made = await standing_still(server, client.ids[A])
        (h2c,) = connections
        assert len(h2c.stream_buffers[A].buffer) < MOST_HELD
        # Its chunks carry many tokens each, so the window and the buffer
        # hold more tokens than with `pause`; beyond them, exactly the cap.
        assert made - tokens_written(client, h2c) == cap
        trace = server.engine.get(client.ids[A]).trace
        assert ("paused", "buffer_full") in [(e.name, e.detail) for e in trace.events]


async def test_one_write_far_larger_than_the_window_is_not_buffered_whole(server, monkeypatch):
    """A non-streamed answer is one body, written at once: here over four
    windows' worth.  hypercorn takes it a piece at a time, so it holds less
    than MOST_HELD bytes of it while the window is closed, and the client
    gets it whole when it reads again."""
    tokens = 60_000
    connections = record_connections(monkeypatch)
    async with connect(server) as client:
        client.request(A, answer_body(tokens), hold=True)
        window = client.conn.remote_settings.initial_window_size
        with trio.fail_after(30):
            await client.until(lambda: len(client.bodies[A]) == window)  # A's window is spent
        await trio.testing.wait_all_tasks_blocked()
        (h2c,) = connections
        assert len(h2c.stream_buffers[A].buffer) < MOST_HELD
        client.reopen(A)
        with trio.fail_after(30):
            await client.until(lambda: A in client.ended)
    assert len(client.bodies[A]) > 4 * window
    answer = json.loads(client.bodies[A])
    assert answer["choices"][0]["message"]["content"] == "".join(expected_tokens(tokens))


async def test_reopening_the_window_resumes_the_stream_whole(server):
    """hypercorn parks a stream whose window is closed; a WINDOW_UPDATE must
    wake it, though no new write comes to (its writer waits for the buffer
    to drain)."""
    tokens = 5_000  # several windows' worth
    async with connect(server) as client:
        client.request(A, stream_body("Hello", tokens), hold=True)
        client.request(B, stream_body("B", B_TOKENS))
        await client.hold_a_until_b_ends()
        assert await standing_still(server, client.ids[A]) < A_BOUND < tokens
        client.reopen(A)
        with trio.fail_after(30):
            await client.until(lambda: A in client.ended)
    assert client.bodies[A].rstrip().endswith(b"data: [DONE]")
    assert text_of(client.bodies[A]) == "".join(expected_tokens(tokens))
    assert server.engine.get(client.ids[A]).trace.names()[-1] == "done"


async def test_a_large_write_into_an_open_window_needs_no_window_update(server):
    """hypercorn parks a stream whose buffer is empty and wakes it when the
    writer buffers more, so each piece of a large write must wake it.  This
    client's windows are wider than the answer, so it sends no WINDOW_UPDATE
    that could wake a stream parked by mistake with bytes in its buffer
    (pieces pushed behind hypercorn's back hang here)."""
    tokens = 60_000
    async with connect(server, window=1 << 24) as client:
        client.request(A, answer_body(tokens))
        with trio.fail_after(30):
            await client.until(lambda: A in client.ended)
    answer = json.loads(client.bodies[A])
    assert answer["choices"][0]["message"]["content"] == "".join(expected_tokens(tokens))


@pytest.mark.parametrize("leaves", ["reset", "close"])
async def test_a_held_stream_frees_its_writer_when_the_client_leaves(server, leaves):
    """A writer waiting for a window that will never open must still learn
    that its stream is gone: reset (RST_STREAM, RFC 9113 §6.4) or the
    whole connection closed."""
    async with connect(server) as client:
        client.request(A, stream_body("Hello", A_TOKENS), hold=True)
        client.request(B, stream_body("B", B_TOKENS))
        await client.hold_a_until_b_ends()
        gen = server.engine.get(client.ids[A])
        await standing_still(server, gen.id)
        if leaves == "reset":
            client.conn.reset_stream(A, h2.errors.ErrorCodes.CANCEL)
            await client.sock.send_all(client.conn.data_to_send())
    with trio.fail_after(10):
        await gen.ended.wait()
    last = gen.trace.events[-1]
    assert (last.name, last.detail) == ("cancelled", "client_disconnect")


def grpc_chunks(body: bytes) -> list[pb.ChatChunk]:
    """The whole ChatChunk messages of a gRPC response body (5-byte prefixes;
    a held stream's body may end inside one)."""
    chunks = []
    while len(body) >= 5 and len(body) >= 5 + (size := int.from_bytes(body[1:5], "big")):
        chunks.append(pb.ChatChunk.FromString(body[5 : 5 + size]))
        body = body[5 + size :]
    return chunks


async def test_grpc_a_closed_window_pauses_its_own_call_only(server):
    """The same over gRPC: a call whose window stays shut pauses its own
    model (its token count stands still, far below "forever") while its
    sibling call on the same connection completes whole."""

    def ask(tokens: int) -> pb.ChatRequest:
        knobs = pb.Simulate(tokens=tokens, ttft_ms=0, itl_ms=0)
        return pb.ChatRequest(messages=[pb.Message(role="user", content="Hello")], simulate=knobs)

    async with connect(server) as client:
        client.grpc_request(A, ask(A_TOKENS), hold=True)
        client.grpc_request(B, ask(B_TOKENS))
        window = client.conn.remote_settings.initial_window_size
        with trio.fail_after(30):
            await client.until(lambda: B in client.ended and len(client.bodies[A]) == window)
        held = server.engine.get(client.ids[A])
        await trio.testing.wait_all_tasks_blocked()
        made = held.completion_tokens
        await trio.testing.wait_all_tasks_blocked()
        assert held.completion_tokens == made and not held.finished  # paused, not running on
        # Every token made is at the client, or in hypercorn's buffer (< MOST_HELD bytes).
        received = sum(count_tokens(c.content) for c in grpc_chunks(client.bodies[A]))
        assert received <= made < received + MOST_HELD // 4  # a token is more than 4 bytes on the wire
    b = grpc_chunks(client.bodies[B])
    assert "".join(c.content for c in b) == "".join(expected_tokens(B_TOKENS))
    assert b[-1].usage.completion_tokens == B_TOKENS


def test_the_switch_puts_hypercorns_own_classes_back(monkeypatch):
    """REFIMPL_H2_FLOW=0 runs the broken version (lesson 06), and back."""
    from hypercorn import protocol as hypercorn_protocol
    from hypercorn.protocol import h2 as hypercorn_h2_module

    from refimpl import hypercorn_h2

    monkeypatch.setenv("REFIMPL_H2_FLOW", "0")
    hypercorn_h2.install()
    assert hypercorn_protocol.H2Protocol is hypercorn_h2.STOCK_H2_PROTOCOL
    assert hypercorn_h2_module.StreamBuffer is hypercorn_h2.STOCK_STREAM_BUFFER
    monkeypatch.delenv("REFIMPL_H2_FLOW")
    hypercorn_h2.install()
    assert hypercorn_protocol.H2Protocol is hypercorn_h2.FlowH2Protocol
    assert hypercorn_h2_module.StreamBuffer is hypercorn_h2.FlowStreamBuffer
