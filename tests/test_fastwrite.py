"""The hypercorn write fast path (``refimpl/hypercorn_patches.py``, lesson 13).

Two layers, like the module's argument for why it is safe:

* every branch of ``FastTCPServer.protocol_send`` on a socket pair, where a
  full socket, a partial write, a closed peer, a TLS stream, a held send
  lock and a cancel during a partial write can be made to happen exactly,
  not by luck;
* real servers on 127.0.0.1:0 read by a raw socket client speaking HTTP/1.1
  through h11, so the test sees every byte: large streams are byte-identical
  with the fast path on and off, a client with a tiny receive buffer that
  stops reading forces EAGAIN and still gets every byte in order, a client
  that hangs up mid-write cancels its generation, and with
  ``REFIMPL_FASTWRITE=0`` the stock path is used.

Synchronisation is by observation (a spy on ``os.write`` that sets an event
when the socket is full, ``Generation.ended``), never by sleeping; the
``fail_after`` guards only turn a hang into a failure, and every socket is
closed on the way out, pass or fail: a server blocked writing to a socket
nobody reads and nobody closes would hang the teardown instead of failing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import chat_body
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from refimpl.hypercorn_contain import ContainedTCPServer
from refimpl.hypercorn_patches import FastTCPServer
from refimpl.model import simulated_text, simulated_token
from refimpl.sse import SSEParser


# -- spies -----------------------------------------------------------------------
class WriteSpy:
    """Wraps ``os.write``: records each call's outcome, flags a full socket."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int | str]] = []  # (len(data), sent or "EAGAIN"/"OSError")
        self.full = trio.Event()
        real = os.write

        def write(fd: int, data: Any) -> int:
            try:
                sent = real(fd, data)
            except BlockingIOError:
                self.calls.append((len(data), "EAGAIN"))
                self.full.set()
                raise
            except OSError:
                self.calls.append((len(data), "OSError"))
                raise
            self.calls.append((len(data), sent))
            if sent < len(data):
                self.full.set()
            return sent

        monkeypatch.setattr(os, "write", write)

    @property
    def short(self) -> int:
        """Writes the fast path could not finish: EAGAIN or partial."""
        return sum(1 for n, r in self.calls if r == "EAGAIN" or (isinstance(r, int) and r < n))


class StockSpy:
    """Wraps the stock ``TCPServer.protocol_send``: which class, which data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.classes: set[type] = set()
        self.raw: list[bytes] = []
        real = TCPServer.protocol_send

        async def protocol_send(server: TCPServer, event: Any) -> None:
            if isinstance(event, RawData):
                self.classes.add(type(server))
                self.raw.append(bytes(event.data))
            await real(server, event)

        monkeypatch.setattr(TCPServer, "protocol_send", protocol_send)


# -- unit level: one FastTCPServer on a socket pair ------------------------------
class FakeProtocol:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, event: Any) -> None:
        self.events.append(event)


def server_on(stream: Any) -> FastTCPServer:
    """A FastTCPServer around ``stream`` without an app: only protocol_send runs."""
    server = FastTCPServer(None, HypercornConfig(), None, {}, stream)
    server.protocol = FakeProtocol()
    return server


@asynccontextmanager
async def socket_pair(
    sndbuf: int | None = None,
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """Our end and the peer's, both closed on the way out.

    Closing them is what frees a write stuck on a full socket (it fails), so
    a test that fails mid-write ends instead of waiting for it: open the pair
    *inside* the nursery that runs the writer.
    """
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    async with ours, theirs:
        yield ours, theirs


def fill(stream: trio.SocketStream) -> bytes:
    """Write into the socket until the kernel refuses; return what was written."""
    fd, written = stream.socket.fileno(), bytearray()
    while True:
        try:
            written += b"f" * os.write(fd, b"f" * 4096)
        except BlockingIOError:
            return bytes(written)


async def drain(stream: trio.SocketStream, n: int) -> bytes:
    """Exactly ``n`` bytes from the peer's end (failing, not hanging, if they
    never come)."""
    out = bytearray()
    with trio.fail_after(10):
        while len(out) < n:
            data = await stream.receive_some(65536)
            assert data, f"the stream ended after {len(out)} of {n} bytes"
            out += data
    return bytes(out)


async def read_to_eof(stream: trio.SocketStream, limit: float = 10) -> bytes:
    """Everything the peer's end receives until our end is closed (failing,
    not hanging, after ``limit`` seconds)."""
    out = bytearray()
    with trio.fail_after(limit):
        while data := await stream.receive_some(65536):
            out += data
    return bytes(out)


async def test_whole_write_is_one_system_call(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    async with socket_pair() as (ours, theirs):
        server = server_on(ours)
        await server.protocol_send(RawData(b"data: hello\n\n"))
        assert await drain(theirs, 13) == b"data: hello\n\n"
    assert spy.calls == [(13, 13)] and stock.raw == [] and server.protocol.events == []


async def test_full_socket_falls_back_and_keeps_order(monkeypatch):
    event = bytes(range(256)) * 64
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, socket_pair() as (ours, theirs):
            before = fill(ours)  # a reader that has stopped reading
            spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
            nursery.start_soon(server_on(ours).protocol_send, RawData(event))
            await spy.full.wait()  # the fast path met EAGAIN and handed over
            got = await drain(theirs, len(before) + len(event))
    assert got == before + event
    assert spy.calls[-1] == (len(event), "EAGAIN") and stock.raw == [event]


async def test_partial_write_sends_the_rest_before_anything_else(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    big, after = b"x" * 1_000_000, b"y" * 100  # far more than the buffer holds
    async with trio.open_nursery() as nursery, socket_pair(sndbuf=4096) as (ours, theirs):
        server = server_on(ours)

        async def writer() -> None:
            await server.protocol_send(RawData(big))
            await server.protocol_send(RawData(after))

        nursery.start_soon(writer)
        got = await drain(theirs, len(big) + len(after))
    assert got == big + after
    n, sent = spy.calls[0]
    assert n == len(big) and 0 < sent < n  # the kernel took a part...
    assert stock.raw[0] == big[sent:]  # ...and the stock path the rest


async def test_held_send_lock_means_no_direct_write(monkeypatch):
    """Someone holds the send lock (a stock write in progress): our write
    must wait its turn on the stock path, not slip past it onto the wire."""
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, socket_pair() as (ours, theirs):
            server = server_on(ours)
            async with server.send_lock:  # what the stock path holds while it writes
                nursery.start_soon(server.protocol_send, RawData(b"second"))
                await trio.testing.wait_all_tasks_blocked()  # the writer is queued on the lock
                assert spy.calls == [] and stock.raw == [b"second"]  # and wrote nothing
                await ours.send_all(b"first")  # the lock holder's own write
            got = await drain(theirs, len(b"firstsecond"))
    assert got == b"firstsecond"  # after the lock holder's bytes, never inside them
    assert spy.calls == [] and server.protocol.events == []


@pytest.mark.parametrize("cancelled", ["before the write", "during the rest"])
async def test_cancel_after_a_partial_write_never_cuts_the_event(monkeypatch, cancelled):
    """The kernel took part of the event; a cancel must not stop the rest.

    "Before the write": the cancel is already pending when the writer calls
    (it arrived after the writer's last checkpoint), so the first ``await``
    on the way to the rest -- taking the send lock -- would deliver it, and
    only the fast path's own shield keeps it from cutting the event there.
    "During the rest": it arrives while the rest waits for the socket.
    """
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    event = b"data: " + b"x" * 1_000_000 + b"\n\n"  # far more than the buffer holds
    async with trio.open_nursery() as nursery, socket_pair(sndbuf=4096) as (ours, theirs):
        server = server_on(ours)
        scope = trio.CancelScope()

        async def writer() -> None:
            with scope:
                if cancelled == "before the write":
                    scope.cancel()
                await server.protocol_send(RawData(event))
            await ours.aclose()  # the reader sees where the writer stopped

        nursery.start_soon(writer)
        with trio.fail_after(10):
            await spy.full.wait()  # the kernel took a part of the event
        scope.cancel()  # (a no-op in the first case: it is already cancelled)
        got = await read_to_eof(theirs)
    n, sent = spy.calls[0]
    assert n == len(event) and 0 < sent < n and stock.raw == [event[sent:]]
    assert len(got) == len(event) and got == event  # the whole event, not a half


async def test_broken_connection_is_closed_like_the_stock_path(monkeypatch):
    spy = WriteSpy(monkeypatch)
    async with socket_pair() as (ours, theirs):
        await theirs.aclose()
        server = server_on(ours)
        await server.protocol_send(RawData(b"data: late\n\n"))  # must not raise
    assert spy.calls == [(12, "OSError")]
    assert [type(e) for e in server.protocol.events] == [Closed]


async def test_closed_stream_takes_the_stock_path(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    async with socket_pair() as (ours, _):
        await ours.aclose()  # fileno() is -1 now: never write to a stale fd
        server = server_on(ours)
        await server.protocol_send(RawData(b"data: late\n\n"))
    assert spy.calls == [] and stock.raw == [b"data: late\n\n"]
    assert [type(e) for e in server.protocol.events] == [Closed]


async def test_tls_never_takes_the_fast_path(monkeypatch):
    spy = WriteSpy(monkeypatch)
    seen: list[type] = []

    async def stock(server: TCPServer, event: Any) -> None:  # no handshake to do here
        seen.append(type(server.stream))

    monkeypatch.setattr(TCPServer, "protocol_send", stock)
    async with socket_pair() as (ours, _):
        tls = trio.SSLStream(ours, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), server_side=True)
        await server_on(tls).protocol_send(RawData(b"secret"))
    assert seen == [trio.SSLStream] and spy.calls == []


# -- real servers, a raw HTTP/1.1 client --------------------------------------------
@asynccontextmanager
async def posted(
    url: str, body: dict[str, Any], rcvbuf: int | None = None
) -> AsyncIterator[tuple[trio.SocketStream, h11.Connection]]:
    """A connection (optionally with a tiny receive buffer) that has sent the
    request; closed on the way out, so a server blocked writing to it is
    freed even when the test fails."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with trio.socket.socket() as sock:
        if rcvbuf:  # before connect, so the advertised window is small too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, int(port)))
        stream, conn = trio.SocketStream(sock), h11.Connection(h11.CLIENT)
        payload = json.dumps(body).encode()
        headers = [
            ("Host", host),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
        ]
        await stream.send_all(
            conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers))
            + conn.send(h11.Data(data=payload))
            + conn.send(h11.EndOfMessage())
        )
        yield stream, conn


async def read_body(stream: trio.SocketStream, conn: h11.Connection, read_size: int = 65536) -> bytes:
    """The de-chunked response body, every byte, until the end of the message."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(read_size))  # b"": h11 raises
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:  # nothing else can come before the end: fail, do not spin
            raise AssertionError(f"unexpected {event!r} after {len(body)} body bytes")


def tokens_in(body: bytes) -> list[str]:
    parser, tokens = SSEParser(), []
    events = parser.feed(body) + parser.close()
    assert events[-1].data == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event.data)
        if chunk["choices"] and (content := chunk["choices"][0]["delta"].get("content")):
            tokens.append(content)
    return tokens


def expected_tokens(n: int) -> list[str]:
    text = simulated_text("Hello", 0)  # chat_body's prompt, the default seed
    return [simulated_token(text, i) for i in range(n)]


def stream_body(tokens: int) -> dict[str, Any]:
    return chat_body(
        stream=True, stream_options={"include_usage": True}, simulate={"tokens": tokens, "itl_ms": 0}
    )


async def test_large_stream_is_byte_identical_with_and_without_fast_path(start_server, monkeypatch):
    n, bodies = 20_000, {}
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    for setting in ("1", "0"):
        monkeypatch.setenv("REFIMPL_FASTWRITE", setting)
        spy.calls.clear(), stock.classes.clear(), stock.raw.clear()
        server = await start_server()
        with trio.fail_after(30):
            async with posted(server.url, stream_body(n)) as (stream, conn):
                body = await read_body(stream, conn)
        # Only the generation's id and timestamp may differ between the runs.
        bodies[setting] = re.sub(
            rb'"id":"chatcmpl-\w+","object":"chat.completion.chunk","created":\d+',
            b'"id":"ID","object":"chat.completion.chunk","created":0',
            body,
        )
        assert tokens_in(body) == expected_tokens(n)
        if setting == "1":
            assert stock.classes <= {FastTCPServer} and spy.calls  # the fast path wrote
        else:  # disabled: the stock class, the stock path, no direct writes
            assert (
                stock.classes == {ContainedTCPServer}  # hypercorn's, one exception contained
                and spy.calls == []
                and b"".join(stock.raw).endswith(b"0\r\n\r\n")
            )
    assert bodies["1"] == bodies["0"]


async def test_slow_reader_forces_eagain_and_gets_every_byte_in_order(start_server, monkeypatch):
    monkeypatch.setenv("REFIMPL_FASTWRITE", "1")
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    server = await start_server()
    n = 50_000  # ~11 MB: far more than both socket buffers hold
    with trio.fail_after(60):
        async with posted(server.url, stream_body(n), rcvbuf=4096) as (stream, conn):
            await spy.full.wait()  # we read nothing yet: the server's socket is full
            body = await read_body(stream, conn, read_size=1024)  # then read in small bites
    assert spy.short >= 1 and stock.raw  # the fallback really ran
    assert tokens_in(body) == expected_tokens(n)


async def test_client_disconnect_mid_write_cancels_the_generation(start_server, monkeypatch):
    monkeypatch.setenv("REFIMPL_FASTWRITE", "1")
    spy = WriteSpy(monkeypatch)
    server = await start_server()
    with trio.fail_after(30):
        async with posted(server.url, stream_body(10_000_000), rcvbuf=4096) as (stream, _conn):
            await spy.full.wait()  # mid-write: the server is blocked on a full socket
            [gen] = server.engine.active.values()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # linger 0: an abortive close, a reset
            await gen.ended.wait()
    assert gen.trace.names()[-1] == "cancelled"
    assert gen.trace.events[-1].detail == "client_disconnect"
    assert 0 < gen.completion_tokens < 10_000_000
    assert not server.engine.active
