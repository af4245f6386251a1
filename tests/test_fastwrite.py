"""The hypercorn write fast path (``refimpl/hypercorn_patches.py``, lesson 13).

Two layers, like the module's argument for why it is safe:

* every branch of ``FastTCPServer.protocol_send`` on a socket pair, where a
  full socket, a partial write, a closed peer and a TLS stream can be made
  to happen exactly, not by luck;
* real servers on 127.0.0.1:0 read by a raw socket client speaking HTTP/1.1
  through h11, so the test sees every byte: large streams are byte-identical
  with the fast path on and off, a client with a tiny receive buffer that
  stops reading forces EAGAIN and still gets every byte in order, a client
  that hangs up mid-write cancels its generation, and with
  ``REFIMPL_FASTWRITE=0`` the stock path is used.

Synchronisation is by observation (a spy on ``os.write`` that sets an event
when the socket is full, ``Generation.ended``), never by sleeping; the
``fail_after`` guards only turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
from typing import Any

import h11
import hypercorn.trio.run as hypercorn_run
import pytest
import trio
from conftest import chat_body
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from refimpl import hypercorn_patches
from refimpl.hypercorn_patches import FastTCPServer
from refimpl.model import simulated_text
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


def socket_pair(sndbuf: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


def fill(stream: trio.SocketStream) -> bytes:
    """Write into the socket until the kernel refuses; return what was written."""
    fd, written = stream.socket.fileno(), bytearray()
    while True:
        try:
            written += b"f" * os.write(fd, b"f" * 4096)
        except BlockingIOError:
            return bytes(written)


async def drain(stream: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive_some(65536)
    return bytes(out)


async def test_whole_write_is_one_system_call(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    ours, theirs = socket_pair()
    server = server_on(ours)
    await server.protocol_send(RawData(b"data: hello\n\n"))
    assert await theirs.receive_some(100) == b"data: hello\n\n"
    assert spy.calls == [(13, 13)] and stock.raw == [] and server.protocol.events == []


async def test_full_socket_falls_back_and_keeps_order(monkeypatch):
    ours, theirs = socket_pair()
    before = fill(ours)  # a reader that has stopped reading
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    server = server_on(ours)
    event = bytes(range(256)) * 64
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.protocol_send, RawData(event))
        await spy.full.wait()  # the fast path met EAGAIN and handed over
        got = await drain(theirs, len(before) + len(event))
    assert got == before + event
    assert spy.calls[-1] == (len(event), "EAGAIN") and stock.raw == [event]


async def test_partial_write_sends_the_rest_before_anything_else(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    ours, theirs = socket_pair(sndbuf=4096)
    server = server_on(ours)
    big, after = b"x" * 1_000_000, b"y" * 100  # far more than the buffer holds
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            await server.protocol_send(RawData(big))
            await server.protocol_send(RawData(after))

        nursery.start_soon(writer)
        got = await drain(theirs, len(big) + len(after))
    assert got == big + after
    n, sent = spy.calls[0]
    assert n == len(big) and 0 < sent < n  # the kernel took a part...
    assert stock.raw[0] == big[sent:]  # ...and the stock path the rest


async def test_broken_connection_is_closed_like_the_stock_path(monkeypatch):
    spy = WriteSpy(monkeypatch)
    ours, theirs = socket_pair()
    await theirs.aclose()
    server = server_on(ours)
    await server.protocol_send(RawData(b"data: late\n\n"))  # must not raise
    assert spy.calls == [(12, "OSError")]
    assert [type(e) for e in server.protocol.events] == [Closed]


async def test_closed_stream_takes_the_stock_path(monkeypatch):
    spy, stock = WriteSpy(monkeypatch), StockSpy(monkeypatch)
    ours, _ = socket_pair()
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
    ours, _ = socket_pair()
    tls = trio.SSLStream(ours, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), server_side=True)
    await server_on(tls).protocol_send(RawData(b"secret"))
    assert seen == [trio.SSLStream] and spy.calls == []


async def test_install_is_explicit_idempotent_and_reversible(monkeypatch):
    monkeypatch.setattr(hypercorn_run, "TCPServer", TCPServer)  # restored afterwards
    assert hypercorn_patches.install(True) and hypercorn_patches.install(True)
    assert hypercorn_run.TCPServer is FastTCPServer
    assert not hypercorn_patches.install(False) and hypercorn_run.TCPServer is TCPServer
    monkeypatch.setenv("REFIMPL_FASTWRITE", "0")
    assert not hypercorn_patches.install() and hypercorn_run.TCPServer is TCPServer
    monkeypatch.setenv("REFIMPL_FASTWRITE", "1")
    assert hypercorn_patches.install() and hypercorn_run.TCPServer is FastTCPServer


# -- real servers, a raw HTTP/1.1 client --------------------------------------------
async def post(
    url: str, body: dict[str, Any], rcvbuf: int | None = None
) -> tuple[trio.SocketStream, h11.Connection]:
    """Open a connection (optionally with a tiny receive buffer) and send the request."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    if rcvbuf:  # before connect, so the advertised window is small too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    stream, conn = trio.SocketStream(sock), h11.Connection(h11.CLIENT)
    payload = json.dumps(body).encode()
    headers = [("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    await stream.send_all(
        conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers))
        + conn.send(h11.Data(data=payload))
        + conn.send(h11.EndOfMessage())
    )
    return stream, conn


async def read_body(stream: trio.SocketStream, conn: h11.Connection, read_size: int = 65536) -> bytes:
    """The de-chunked response body, every byte, until the end of the message."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(read_size))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)


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
    return [text[i % len(text)] for i in range(n)]


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
            stream, conn = await post(server.url, stream_body(n))
            body = await read_body(stream, conn)
            await stream.aclose()
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
                stock.classes == {TCPServer}
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
        stream, conn = await post(server.url, stream_body(n), rcvbuf=4096)
        await spy.full.wait()  # we read nothing yet: the server's socket is full
        body = await read_body(stream, conn, read_size=1024)  # then read in small bites
    assert spy.short >= 1 and stock.raw  # the fallback really ran
    assert tokens_in(body) == expected_tokens(n)


async def test_client_disconnect_mid_write_cancels_the_generation(start_server, monkeypatch):
    monkeypatch.setenv("REFIMPL_FASTWRITE", "1")
    spy = WriteSpy(monkeypatch)
    server = await start_server()
    with trio.fail_after(30):
        stream, _conn = await post(server.url, stream_body(10_000_000), rcvbuf=4096)
        await spy.full.wait()  # mid-write: the server is blocked on a full socket
        [gen] = server.engine.active.values()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # linger 0: an abortive close, a reset
        await gen.ended.wait()
    assert gen.trace.names()[-1] == "cancelled"
    assert gen.trace.events[-1].detail == "client_disconnect"
    assert 0 < gen.completion_tokens < 10_000_000
    assert not server.engine.active
