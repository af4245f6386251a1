"""Slow and half-sent requests, and connections per address (``hypercorn_limits.py``).

Each fault is made for real, with raw trio sockets (or the ``h2`` state
machine over one, or grpcio): headers that stop coming, a body that stops
half-way (``Content-Length`` and chunked), an HTTP/2 stream whose body
stalls, one connection more than the cap.  The server runs with short
timeouts; the tests assert outcomes (status, error shape, that the socket
reads EOF afterwards), never how long anything took.  Where a test needs
"longer than a timeout" to have passed (an idle keep-alive connection, an idle
gRPC call), a *witness* proves it: a half-sent request on another connection,
which the server answers only once that timeout has run out.
"""

from __future__ import annotations

import json
import ssl
from functools import partial

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from conftest import TEST_SIMULATE, Server, chat_body
from test_grpc import Outbox  # the client side of a bidi call

from refimpl import hypercorn_limits
from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.tls import local_certificate
from refimpl.v1 import chat_pb2 as pb
from refimpl.v1 import chat_pb2_grpc

HEADER_TIMEOUT = 0.3
BODY_TIMEOUT = 0.5
BODY = json.dumps(chat_body("x" * 200)).encode()
POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"


async def limited(start_server, **changes) -> Server:
    return await start_server(**{"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT, **changes})


async def connect(server: Server) -> trio.SocketStream:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (EOF); fails on a reset."""
    got = b""
    while data := await stream.receive_some(65536):
        got += data
    return got


def one_response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of the *only* response in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert len(body) == int(headers["content-length"]), "more than one response, or a cut one"
    return int(lines[0].split()[1]), headers, json.loads(body)


def counted(server: Server, name: str, **labels: str) -> float:
    """A counter's value in the server's /metrics registry."""
    return server.engine.metrics.registry.get_sample_value(name, labels) or 0.0


def assert_request_timeout(error: dict, part: str) -> None:
    assert error["error"]["type"] == "invalid_request_error"  # the client's fault
    assert error["error"]["code"] == "request_timeout"
    assert error["error"]["message"].startswith(f"The request {part} did not arrive")


async def witness(server: Server, part: str = "headers") -> int:
    """A request left half-sent on a connection of its own; returns the status
    the server answers it with -- which it does only once that part's
    timeout has run out, so when this returns, that much time has passed."""
    async with await connect(server) as stream:
        if part == "headers":
            await stream.send_all(POST)
        else:
            await stream.send_all(POST + b"content-length: %d\r\n\r\n" % len(BODY) + BODY[:10])
        status, _, _ = one_response(await read_to_eof(stream))
    return status


# -- HTTP/1.1: headers, body ---------------------------------------------------------
async def test_headers_trickled_byte_by_byte_then_stopped_get_408_and_close(start_server):
    server = await limited(start_server)
    for start in (POST, b"GET /v1/ws/chat HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\n"):
        async with await connect(server) as stream:
            for byte in start:  # one byte per send: the slowloris way
                await stream.send_all(bytes([byte]))
            status, headers, error = one_response(await read_to_eof(stream))
        assert (status, headers["connection"]) == (408, "close")
        assert_request_timeout(error, "headers")
    assert counted(server, "refimpl_request_timeouts_total", part="headers") == 2


async def test_a_body_that_stops_half_way_gets_408_and_the_connection_closes(start_server):
    server = await limited(start_server)
    half = BODY[: len(BODY) // 2]
    for request in (
        POST + b"content-length: %d\r\n\r\n" % len(BODY) + half,
        POST + b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(half) + half + b"\r\n",
    ):
        async with await connect(server) as stream:
            await stream.send_all(request)
            status, headers, error = one_response(await read_to_eof(stream))
        assert (status, headers["connection"]) == (408, "close")
        assert_request_timeout(error, "body")
    assert not server.engine.active
    # One 408 per request, counted (/metrics), however many timers raced to send it.
    assert counted(server, "refimpl_request_timeouts_total", part="body") == 2


async def test_an_idle_keep_alive_connection_and_a_steady_upload_are_fine(start_server, client):
    server = await limited(start_server, simulate=TEST_SIMULATE)
    async with await connect(server) as stream:
        await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        first = await stream.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200")
        # Idle between requests for longer than both timeouts ...
        assert await witness(server, "body") == 408
        # ... then a body sent in pieces, each after the last, within the limit.
        await stream.send_all(POST + b"content-length: %d\r\n\r\n" % len(BODY))
        for i in range(0, len(BODY), 20):
            await stream.send_all(BODY[i : i + 20])
            await trio.sleep(0.001)  # the upload's pace (not a synchronisation)
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def test_a_stream_longer_than_the_body_timeout_is_not_cut(start_server, client):
    server = await limited(start_server)
    body = chat_body(stream=True, simulate={"tokens": 10, "itl_ms": 100})  # ~1 s: twice the body timeout
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
        lines = [line async for line in resp.aiter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"


# -- HTTP/2 --------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["h2c", "tls"])
async def test_an_h2_stream_whose_body_stalls_gets_408_and_the_connection_lives(
    start_server, nursery, tmp_path, transport
):
    """Over HTTP/2 (h2c prior knowledge; TLS with ALPN) the stalled stream is
    answered, the connection and its other streams go on; DATA that arrives
    for the answered stream afterwards is dropped (it used to crash the server)."""
    if transport == "tls":
        tls = local_certificate(tmp_path)
        config = Config(simulate=TEST_SIMULATE, header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT)
        app = create_app(config)
        url = await nursery.start(partial(serve, app, certfile=str(tls.certfile), keyfile=str(tls.keyfile)))
        trust = ssl.create_default_context(cafile=str(tls.ca))
        trust.set_alpn_protocols(["h2"])
        host, port = url.removeprefix("https://").rsplit(":", 1)
        opened = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=trust)
    else:
        opened = await connect(await limited(start_server))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    base = [(":scheme", "http"), (":authority", "t")]
    post = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")]
    post.append(("content-length", str(len(BODY))))
    conn.send_headers(1, base + post)
    conn.send_data(1, BODY[:50])
    async with opened as stream:

        async def until_ended(stream_id: int) -> tuple[int, bytes]:
            status, data = 0, b""
            while True:
                incoming = await stream.receive_some(65536)
                assert incoming, "the server closed the connection"
                for event in conn.receive_data(incoming):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                        return status, data
                await stream.send_all(conn.data_to_send())

        await stream.send_all(conn.data_to_send())
        status, data = await until_ended(1)
        assert status == 408
        assert_request_timeout(json.loads(data), "body")
        conn.send_data(1, BODY[50:], end_stream=True)  # the rest, too late
        conn.send_headers(3, [*base, (":method", "GET"), (":path", "/v1/models")], end_stream=True)
        await stream.send_all(conn.data_to_send())
        status, data = await until_ended(3)
    assert status == 200 and json.loads(data)["object"] == "list"


async def test_an_h2_connection_counts_once_however_many_streams(start_server):
    server = await limited(start_server, max_connections_per_client=1)
    async with httpx.AsyncClient(http1=False, http2=True) as h2c:
        statuses = []

        async def get() -> None:
            statuses.append((await h2c.get(f"{server.url}/v1/models")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(get)
    assert statuses == [200] * 5


# -- the cap -------------------------------------------------------------------------
async def test_the_connection_past_the_cap_is_closed_before_a_byte_is_read(start_server):
    server = await limited(start_server, max_connections_per_client=3)
    held = [await connect(server) for _ in range(3)]
    for stream in held:  # each is served (and stays open: keep-alive)
        await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
    async with await connect(server) as fourth:
        assert await read_to_eof(fourth) == b""  # closed, nothing sent
    limits = server.app.extensions["refimpl.connection_limits"]
    assert limits.refused == 1 and limits.open["127.0.0.1"] == 3
    assert counted(server, "refimpl_refused_connections_total") == 1
    await held.pop().aclose()
    # The freed slot is taken by the next connection, as soon as the server
    # has seen the close (each try is a round trip through it, not a sleep).
    for _ in range(100):
        async with await connect(server) as again:
            await again.send_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            if answer := await read_to_eof(again):
                break
    assert answer.startswith(b"HTTP/1.1 200")
    for stream in held:
        await stream.aclose()


# -- gRPC: a bidi call's request body lasts as long as the call ---------------------
async def test_a_bidi_grpc_call_idle_longer_than_the_body_timeout_survives(start_server):
    server = await limited(start_server)
    out, token = Outbox(), trio.lowlevel.current_trio_token()
    chat = pb.ClientMessage(
        chat=pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=3)
    )

    def call() -> list[str]:
        done = []
        with grpc.insecure_channel(server.url.removeprefix("http://")) as channel:
            out.queue.put(chat)
            for message in chat_pb2_grpc.ChatServiceStub(channel).Chat(iter(out), timeout=30):
                if message.WhichOneof("kind") != "done":
                    continue
                done.append(message.done.finish_reason)
                if len(done) == 1:  # idle past the body timeout, then a second turn
                    assert trio.from_thread.run(witness, server, "body", trio_token=token) == 408
                    out.queue.put(chat)
                else:
                    out.queue.put(None)
        return done

    assert await trio.to_thread.run_sync(call) == ["length", "length"]


def test_hypercorn_is_what_the_limits_were_written_for():
    assert hypercorn_limits.fingerprints() == hypercorn_limits.WRITTEN_FOR, (
        "hypercorn changed under refimpl/hypercorn_limits.py: re-read the methods whose "
        "fingerprints differ against its classes and docstring, then update WRITTEN_FOR"
    )


async def test_an_early_answer_to_a_half_sent_request_closes_the_connection(start_server):
    """Quart answers 404 without reading the body; the unread rest would be
    read as the next request, so the connection must close.  hypercorn
    closed it from Quart's task, which Quart cancelled mid-close: the
    socket stayed open for good (TimedH11Protocol._maybe_recycle)."""
    server = await limited(start_server, body_timeout=60)  # no clock will help here
    async with await connect(server) as stream:
        await stream.send_all(b"POST /nowhere HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        status, _, error = one_response(await read_to_eof(stream))
    assert status == 404 and error["error"]["code"] == "not_found"
