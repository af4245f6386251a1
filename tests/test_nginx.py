"""A real nginx between a real client and a real server (lessons 08 and 12).

Each test starts refimpl servers in the test's nursery and nginx 1.22 in
front of them (``refimpl/examples/nginx_proxy.py``, config from
``nginx.conf``), then reads the stream through nginx: SSE with
:func:`refimpl.figures.record`, which notes when each event arrived and in
which read, and every other protocol with its usual client (grpcio,
trio-websocket, httpx over HTTP/2, a raw ``h2`` client).  The server runs in
this process on the same trio clock, so a client-side arrival
(``rec.started + arrival.at``) and a stamp in the server's trace
(``GET /v1/debug/generations/{id}``) can be compared: the assertions are
about *order* (did the client have a token before the model had
finished?), never about how many seconds something took.  Independent cases
run concurrently, so a test waits on real time for one silence at most.

What was measured (nginx 1.22.1, ``proxy_read_timeout 2s``), and is asserted
below:

* A silence longer than the read timeout: the client gets ``200``, the
  bytes sent before the silence, then the connection closes with no final
  chunk, and httpx raises ``RemoteProtocolError: peer closed connection
  without sending complete message body (incomplete chunked read)``, which
  our client (``refimpl.client.stream_chat``) raises as a ``StreamError``
  with code ``incomplete``.  nginx logs "upstream timed out ... while
  reading upstream"; the server's trace ends
  ``cancelled(client_disconnect)``.  With a 1 s heartbeat the same request
  ends with ``[DONE]``, every ping reaching the client.
* Proxy buffering on (``X-Accel-Buffering`` ignored), no gzip: events still
  arrive one by one.  gzip on for ``text/event-stream``: one by one while
  nginx honours ``X-Accel-Buffering: no``; when it ignores it, the whole
  stream arrives in one read after the model finished.
* An ``event: error`` passes through byte for byte.
* ``proxy_http_version 1.0`` (nginx's default): the whole stream and
  ``[DONE]`` arrive, but hypercorn never closes an HTTP/1.0 stream, so the
  response stays open until the read timeout cuts it (why the config says 1.1).

Every protocol through the same config (lesson 12):

* nginx 1.22 speaks HTTP/1.x or HTTP/2 on a plain port, not both, hence two
  ports: gRPC and SSE over HTTP/2 (h2c) on one, everything else on the other.
* gRPC (``grpc_pass``), server streaming and bidi, streams what a direct call
  streams; Connect and gRPC-Web from an HTTP/1.1 client pass the same
  location message by message; SSE over h2c arrives token by token; a
  WebSocket keeps its turns.  A grpcio cancel, an HTTP/1.1 client closing
  its connection and an HTTP/2 client resetting its stream each reach the
  server at once: ``cancelled(client_cancel)`` / ``cancelled(client_disconnect)``.
* A WebSocket silent for longer than ``proxy_read_timeout`` closes with code
  1006, unless pings cross the tunnel, the server's or the client's.
* A gRPC call silent for longer than ``grpc_read_timeout`` is cut whatever
  the client does (its keepalive PINGs end at nginx), as ``INTERNAL``
  "... RST_STREAM with error code 2", and the server's trace says
  ``cancelled(client_cancel)``; the server's heartbeat (an id-only chunk
  every ``--heartbeat`` seconds of silence) keeps it alive.  A bidi call idle between turns is cut by
  either side's silence (``grpc_read_timeout``, ``client_body_timeout``), and
  nginx counts a whole bidi call as one request body (``client_max_body_size``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import h2.errors
import httpx
import pytest
import trio
import trio.testing
from conftest import Server, chat_body
from google.protobuf.json_format import MessageToDict
from test_grpc import SLOW, Outbox, request, stub_for
from test_h2_flow import H2Client, text_of
from test_websocket import chat, receive, turn
from trio_websocket import ConnectionClosed, open_websocket_url

from refimpl.client import StreamError, stream_chat
from refimpl.engine import Generation
from refimpl.examples import nginx_proxy
from refimpl.examples.nginx_proxy import (
    NginxNotFound,
    NginxProxy,
    find_nginx,
    free_loopback_port,
    nginx_in_front,
    render_config,
)
from refimpl.figures import Arrival, Recording, record
from refimpl.model import simulated_text
from refimpl.sse import SSEParser
from refimpl.v1 import chat_pb2 as pb
from refimpl.ws_client import ws_url

READ_TIMEOUT = 2  # proxy_read_timeout, seconds
SILENT_5S = {"ttft_ms": 5000, "itl_ms": 0, "tokens": 5}  # silent before the first token
PAUSE_5S = {"ttft_ms": 0, "itl_ms": 5000, "tokens": 2}  # one token, then silent
TWO_SECONDS = {"ttft_ms": 0, "itl_ms": 100, "tokens": 20}  # 20 tokens, 100 ms apart
GZIP = {"Accept-Encoding": "gzip"}
IDENTITY = {"Accept-Encoding": "identity"}
# What httpx raises when nginx closes a chunked response before its last chunk.
CLOSED = "peer closed connection without sending complete message body (incomplete chunked read)"
CUT = {"message": f"RemoteProtocolError: {CLOSED}"}  # as refimpl.figures.record notes it


@pytest.fixture
def nginx() -> str:
    """The nginx binary; in CI a missing one fails the test, never skips it."""
    try:
        return find_nginx()
    except NginxNotFound as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


class Case:
    """One request through its own nginx: what the client saw, the server's
    trace of that generation, and nginx's error log."""

    def __init__(self, rec: Recording, trace: dict, nginx_errors: str) -> None:
        self.rec, self.trace, self.nginx_errors = rec, trace, nginx_errors
        self.names = [e["name"] for e in trace["events"]]

    def stamp(self, name: str) -> float:
        """When the server recorded ``name`` (trio's clock, like the client's)."""
        return next(e["at"] for e in self.trace["events"] if e["name"] == name)

    def arrived_at(self, arrival: Arrival) -> float:
        """When ``arrival`` reached the client, on the server's clock."""
        return self.rec.started + arrival.at

    def tokens(self) -> list[Arrival]:
        return [a for a in self.rec.arrivals if a.kind == "token"]


async def through_nginx(server: Server, simulate: dict, headers: dict | None = None, **settings) -> Case:
    proxy = nginx_in_front(server.url, **settings)
    async with proxy as url:
        rec = await record(url, chat_body(simulate=simulate), headers=headers, timeout=30)
        with trio.fail_after(10):  # a cut stream ends when the server notices
            await server.engine.get(rec.id).ended.wait()
    return Case(rec, await server.trace(rec.id), proxy.errors)


async def concurrently(**jobs) -> dict[str, Case]:
    """Run ``name=lambda: coroutine`` jobs side by side; their results by name."""
    results = {}

    async def run(name, job):
        results[name] = await job()

    async with trio.open_nursery() as nursery:
        for name, job in jobs.items():
            nursery.start_soon(run, name, job)
    return results


# ---------------------------------------------------------------------------
# a. proxy_read_timeout against heartbeats


async def test_silence_longer_than_read_timeout_is_cut_unless_heartbeats(start_server, nginx):
    quiet = await start_server(heartbeat=60)  # longer than nginx's 2 s
    chatty = await start_server(heartbeat=1)  # shorter
    cases = await concurrently(
        silent=lambda: through_nginx(quiet, SILENT_5S, read_timeout=READ_TIMEOUT),
        paused=lambda: through_nginx(quiet, PAUSE_5S, read_timeout=READ_TIMEOUT),
        heartbeat=lambda: through_nginx(chatty, SILENT_5S, read_timeout=READ_TIMEOUT),
        # The pings reset nginx's timer even when gzip keeps them from the client.
        hidden_heartbeat=lambda: through_nginx(
            chatty, SILENT_5S, GZIP, read_timeout=READ_TIMEOUT, gzip=True, honour_accel_buffering=False
        ),
    )

    # No heartbeat: 200, the bytes sent before the silence, then a cut.
    for name, tokens_before in [("silent", 0), ("paused", 1)]:
        case = cases[name]
        assert case.rec.status == 200
        # The role chunk (no content: "other"), and the token before the pause.
        assert [a.kind for a in case.rec.arrivals] == ["other"] + ["token"] * tokens_before
        assert (case.rec.ending, case.rec.error) == ("cut", CUT)
        assert "upstream timed out" in case.nginx_errors
        assert "while reading upstream" in case.nginx_errors
        # nginx hung up on the server too, before the model said another word.
        assert case.trace["events"][-1] == {
            "name": "cancelled",
            "at": case.stamp("cancelled"),
            "tokens": tokens_before,
            "detail": "client_disconnect",
        }
        assert "heartbeat" not in case.names

    # A 1 s heartbeat: the same request completes.
    case = cases["heartbeat"]
    assert case.rec.ending == "done"
    assert len(case.tokens()) == 5
    assert case.names.count("heartbeat") >= 2  # 4 in 5 s, measured
    assert len(case.rec.times("ping")) == case.names.count("heartbeat")  # nginx passed each on
    first_token = case.names.index("first_token")
    assert set(case.names[1:first_token]) == {"heartbeat"}  # during the silence
    assert case.trace["events"][-1]["name"] == "done"
    assert "upstream timed out" not in case.nginx_errors

    # Behind gzip's buffer the client saw nothing until the end, yet nginx,
    # which reads the pings from the server, kept the stream.
    case = cases["hidden_heartbeat"]
    assert case.rec.headers["content-encoding"] == "gzip"
    assert case.rec.ending == "done"
    assert {a.read for a in case.rec.arrivals} == {0}  # the pings too, in the same read
    assert case.arrived_at(case.rec.arrivals[0]) > case.stamp("first_token")
    assert case.names.count("heartbeat") >= 2
    assert "upstream timed out" not in case.nginx_errors


class EditedProxy(NginxProxy):
    """nginx with the shipped config changed in one place: the first
    ``old`` text (which must be there) replaced by ``new``."""

    def __init__(self, upstream: str, old: str, new: str, **settings: Any) -> None:
        super().__init__(upstream, **settings)
        self.old, self.new = old, new

    def config(self, port: int, h2c_port: int) -> str:
        fixed = super().config(port, h2c_port)
        assert self.old in fixed
        return fixed.replace(self.old, self.new, 1)


#: nginx's default upstream protocol put back (in the streaming location, the first).
HTTP_1_0 = ("proxy_http_version 1.1;", "proxy_http_version 1.0;")


async def test_with_http_1_0_upstream_stock_hypercorn_keeps_a_finished_stream_open(
    start_server, nginx, monkeypatch
):
    """The broken version, hypercorn's own classes (``REFIMPL_LIMITS=0``):
    an HTTP/1.0 response can end only with the connection, and hypercorn's
    close after the last event is cancelled half-way (lesson 14), so nginx
    waits for its read timeout and cuts a finished stream."""
    monkeypatch.setenv("REFIMPL_LIMITS", "0")  # read by serve()'s install()
    server = await start_server()
    proxy = EditedProxy(server.url, *HTTP_1_0, read_timeout=READ_TIMEOUT)
    async with proxy as url:
        rec = await record(url, chat_body(), timeout=30)
    case = Case(rec, await server.trace(rec.id), proxy.errors)
    assert rec.arrivals[-1].kind == "done"  # everything arrived ...
    assert len(case.tokens()) == 24
    assert (rec.ending, rec.error) == ("cut", CUT)  # ... then the read timeout
    assert "upstream timed out" in case.nginx_errors
    assert case.names[-1] == "done"


async def test_with_http_1_0_upstream_a_finished_stream_ends_with_its_connection(server, nginx):
    """Ours closes the connection after the last event (``hypercorn_limits.py``),
    which is how an HTTP/1.0 body ends: nginx ends the response at once."""
    proxy = EditedProxy(server.url, *HTTP_1_0, read_timeout=READ_TIMEOUT)
    async with proxy as url:
        rec = await record(url, chat_body(), timeout=30)
    case = Case(rec, await server.trace(rec.id), proxy.errors)
    assert rec.arrivals[-1].kind == "done" and len(case.tokens()) == 24
    assert (rec.ending, rec.error) == ("done", None)
    assert "upstream timed out" not in case.nginx_errors


async def test_our_client_raises_incomplete_when_nginx_cuts_the_stream(start_server, nginx):
    """httpx's RemoteProtocolError becomes the StreamError that
    ``stream_chat`` promises for a body without ``[DONE]``."""
    server = await start_server(heartbeat=60)
    async with (
        nginx_in_front(server.url, read_timeout=READ_TIMEOUT) as url,
        httpx.AsyncClient(timeout=30) as client,
    ):
        seen = []
        with pytest.raises(StreamError) as cut:
            async for event in stream_chat(client, url, chat_body(simulate=PAUSE_5S)):
                seen.append(event)
    assert cut.value.error == {"message": f"the stream ended without [DONE]: {CLOSED}", "code": "incomplete"}
    assert isinstance(cut.value.__cause__, httpx.RemoteProtocolError)
    assert [bool(e.content) for e in seen] == [False, True]  # the role chunk, one token


async def test_curl_through_nginx_exits_18_then_0_with_heartbeats(start_server, nginx):
    """Lesson 08's "try it": the same curl command, cut (exit 18: partial
    transfer) without heartbeats, complete (exit 0) with a 1 s heartbeat."""
    import shutil
    import subprocess

    if shutil.which("curl") is None and not os.environ.get("CI"):
        pytest.skip("needs curl (.ci/run installs it)")

    def run_curl(url: str) -> subprocess.CompletedProcess:
        body = json.dumps(chat_body(stream=True, simulate={"ttft_ms": 5000}))
        return subprocess.run(
            ["curl", "-sN", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
            capture_output=True,
            text=True,
            timeout=30,
        )

    async def through(heartbeat: float) -> subprocess.CompletedProcess:
        server = await start_server(heartbeat=heartbeat)
        async with nginx_in_front(server.url, read_timeout=READ_TIMEOUT) as url:
            return await trio.to_thread.run_sync(run_curl, url)

    cases = await concurrently(quiet=lambda: through(60), beating=lambda: through(1))
    assert cases["quiet"].returncode == 18 and "[DONE]" not in cases["quiet"].stdout
    assert cases["beating"].returncode == 0 and cases["beating"].stdout.endswith("data: [DONE]\n\n")
    assert ": ping\n\n" in cases["beating"].stdout


async def test_the_naive_reader_gets_a_transport_error_not_an_answer(start_server, nginx):
    """nginx's cut leaves the chunked body unfinished, so even the naive
    reader of lesson 07 (which never looks for ``[DONE]``) gets an exception:
    httpx's, not the server's.  Only a body that ends cleanly without
    ``[DONE]`` would pass for a finished answer (tests/js, the seed reader)."""
    from refimpl.examples.midstream_clients import naive_stream

    server = await start_server(heartbeat=60)
    async with nginx_in_front(server.url, read_timeout=READ_TIMEOUT) as url:
        tokens: list[str] = []
        body = chat_body(stream=True, simulate=PAUSE_5S)
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            await trio.to_thread.run_sync(naive_stream, url, body, tokens.append)
    # lesson 01's line splitter hands lines over only once the body has
    # ended, so the cut comes before even the token sent before the silence.
    assert tokens == []


async def test_a_proxy_error_page_is_recorded_not_raised(nginx):
    """``figures.record`` never raises for what a proxy does: nginx's HTML 502
    for an upstream that is not there is a refusal with the page's start."""
    async with nginx_in_front(f"http://127.0.0.1:{free_loopback_port()}") as url:
        rec = await record(url, chat_body())
    assert (rec.status, rec.ending) == (502, "refused")
    assert "502 Bad Gateway" in rec.error["message"] and rec.ended > 0


# ---------------------------------------------------------------------------
# b. buffering: proxy buffers, gzip, and X-Accel-Buffering: no


async def test_gzip_holds_a_stream_back_unless_x_accel_buffering_is_honoured(start_server, nginx):
    server = await start_server()
    cases = await concurrently(
        plain=lambda: through_nginx(server, TWO_SECONDS, IDENTITY),
        plain_header_ignored=lambda: through_nginx(
            server, TWO_SECONDS, IDENTITY, honour_accel_buffering=False
        ),
        gzip=lambda: through_nginx(server, TWO_SECONDS, GZIP, gzip=True),
        gzip_header_ignored=lambda: through_nginx(
            server, TWO_SECONDS, GZIP, gzip=True, honour_accel_buffering=False
        ),
    )
    for name, case in cases.items():
        assert case.rec.ending == "done", name
        assert len(case.tokens()) == 20, name
        assert case.rec.headers.get("content-encoding") == ("gzip" if "gzip" in name else None), name

    # Token by token: most tokens reached the client, each in a read of its
    # own, before the model had finished.  Proxy buffering alone (the header
    # ignored, no gzip) does not hold events back.
    for name in ["plain", "plain_header_ignored", "gzip"]:
        case = cases[name]
        done = case.stamp("done")
        early = [a for a in case.tokens() if case.arrived_at(a) < done]
        assert len(early) >= 10, name
        assert len({a.read for a in early}) == len(early), name

    # gzip without the header's flush: the whole stream in one read, after
    # the model had finished.
    case = cases["gzip_header_ignored"]
    assert {a.read for a in case.rec.arrivals} == {0}
    assert case.arrived_at(case.rec.arrivals[0]) > case.stamp("done")


# ---------------------------------------------------------------------------
# c. a mid-stream error passes through intact

ERROR_EVENT = (
    b"event: error\n"
    b'data: {"error":{"message":"The model failed while generating (overloaded).",'
    b'"type":"server_error","param":null,"code":"overloaded"}}\n\n'
)


async def raw_body(client: httpx.AsyncClient, url: str, body: dict) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        return resp, b"".join([chunk async for chunk in resp.aiter_raw()])


def without_ids(raw: bytes) -> list[tuple[str, object]]:
    """The events, with the fields that differ between two generations removed."""
    events = SSEParser().feed(raw)
    data = [json.loads(e.data) for e in events]
    return [
        (e.type, {k: v for k, v in d.items() if k not in ("id", "created")})
        for e, d in zip(events, data, strict=True)
    ]


async def test_mid_stream_error_passes_through_nginx_intact(server, client, nginx):
    body = chat_body(stream=True, simulate={"tokens": 10, "fail_after_tokens": 3, "fail_with": "overloaded"})
    async with nginx_in_front(server.url, read_timeout=READ_TIMEOUT) as url:
        proxied, via_nginx = await raw_body(client, url, body)
    _, direct = await raw_body(client, server.url, body)
    assert proxied.status_code == 200
    for raw in (via_nginx, direct):
        assert raw.endswith(ERROR_EVENT)
        assert b"[DONE]" not in raw
    assert without_ids(via_nginx) == without_ids(direct)
    assert len(without_ids(direct)) == 1 + 3 + 1  # role, three tokens, the error
    trace = await server.trace(proxied.headers["x-request-id"])
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", "overloaded")


# ---------------------------------------------------------------------------
# d. every protocol through nginx: SSE over HTTP/2, WebSocket, gRPC, Connect


def grpc_target(url: str) -> str:
    return url.removeprefix("http://")


@dataclass
class GrpcOutcome:
    chunks: list[pb.ChatChunk]
    error: grpc.RpcError | None

    def status(self) -> tuple[grpc.StatusCode, str]:
        """How the call ended, as the client saw it."""
        if self.error is None:
            return grpc.StatusCode.OK, ""
        return self.error.code(), self.error.details()

    def text(self) -> str:
        return "".join(c.content for c in self.chunks)


def stream_call(url: str, ask: pb.ChatRequest, options: Sequence = ()) -> GrpcOutcome:
    """One ``StreamChat`` with a stock grpcio client (blocking: run it in a
    worker thread): the chunks that arrived, and the error that ended it."""
    chunks = []
    with grpc.insecure_channel(grpc_target(url), options=list(options)) as channel:
        try:
            for chunk in stub_for(channel).StreamChat(ask, timeout=30):
                chunks.append(chunk)
        except grpc.RpcError as err:
            return GrpcOutcome(chunks, err)
    return GrpcOutcome(chunks, None)


async def the_generation(server: Server) -> Generation:
    """The one generation running on ``server`` (each case has a server of
    its own), found while it runs: a call cut before its response headers
    never learns its id."""
    with trio.fail_after(10):
        while not server.engine.active:
            await trio.testing.wait_all_tasks_blocked()
    (gen,) = server.engine.active.values()
    return gen


async def run_and_trace(server: Server, client: Callable[[], Awaitable[Any]]) -> tuple[Any, dict]:
    """Run ``client``; its result, and the trace of the generation it
    started on ``server``, once that has ended."""
    result = []

    async def run() -> None:
        result.append(await client())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        gen = await the_generation(server)
    with trio.fail_after(10):
        await gen.ended.wait()
    return result[0], await server.trace(gen.id)


def ended_by(trace: dict) -> tuple[str, str | None, int]:
    """How a generation ended: the last event's name, detail and token count."""
    last = trace["events"][-1]
    return last["name"], last["detail"], last["tokens"]


async def test_nginx_1_22_needs_a_second_port_for_h2c(server, client, nginx):
    """Why nginx.conf listens twice (its region "listen"): on nginx 1.22 a
    plain-text port speaks HTTP/1.x or HTTP/2, never both.  Fails, on
    purpose, the day the installed nginx (1.25.1+) serves both on one."""
    proxy = nginx_in_front(server.url)
    async with proxy as url:
        with pytest.raises(httpx.RemoteProtocolError):  # HTTP/2 frames, not a status line
            await client.get(proxy.h2c_url + "/v1/models")
        wrong_port = await trio.to_thread.run_sync(stream_call, url, request())
    code, details = wrong_port.status()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "Trying to connect an http1.x server" in details
    assert not wrong_port.chunks


async def test_grpc_through_nginx_streams_what_a_direct_call_streams(server, nginx):
    ask = request("Same?", seed=7)
    proxy = nginx_in_front(server.url)
    async with proxy:
        via_nginx = await trio.to_thread.run_sync(stream_call, proxy.h2c_url, ask)
    direct = await trio.to_thread.run_sync(stream_call, server.url, ask)
    assert via_nginx.error is None and direct.error is None
    assert via_nginx.text() == direct.text() != ""
    for outcome in (via_nginx, direct):
        last = outcome.chunks[-1]
        assert (last.finish_reason, last.usage.completion_tokens) == ("stop", 24)
    trace = await server.trace(via_nginx.chunks[-1].id)
    assert (trace["protocol"], ended_by(trace)) == ("grpc", ("done", "stop", 24))


async def test_bidi_chat_through_nginx_turns_and_cancels(server, nginx):
    """``Chat`` streams both ways at once: nginx passes the client's next
    message (a cancel) on while the server's answer still streams."""

    def call(url: str) -> list[pb.ServerMessage]:
        out, seen = Outbox(), []
        out.chat(max_tokens=5)
        with grpc.insecure_channel(grpc_target(url)) as channel:
            for message in stub_for(channel).Chat(iter(out), timeout=30):
                seen.append(message)
                kind = message.WhichOneof("kind")
                if kind == "done":
                    out.chat(simulate=SLOW)
                elif kind == "token" and len(seen) > 1 and seen[-2].WhichOneof("kind") == "done":
                    out.cancel()  # the slow turn's first token
                elif kind == "cancelled":
                    out.close()
        return seen

    proxy = nginx_in_front(server.url)
    async with proxy:
        seen = await trio.to_thread.run_sync(call, proxy.h2c_url)
    kinds = [m.WhichOneof("kind") for m in seen]
    assert kinds == ["token"] * kinds.index("done") + ["done", "token", "cancelled"]
    assert seen[kinds.index("done")].done.usage.completion_tokens == 5
    trace = await server.trace(seen[-1].cancelled.id)
    assert ended_by(trace)[:2] == ("cancelled", "client_cancel")


async def read_envelopes(resp: httpx.Response) -> list[tuple[float, int, bytes]]:
    """A Connect or gRPC-Web response body, one envelope (flags, payload) at
    a time, each with the moment it was complete."""
    buffer, envelopes = b"", []
    async for chunk in resp.aiter_raw():
        buffer += chunk
        while len(buffer) >= 5 and len(buffer) >= 5 + (size := int.from_bytes(buffer[1:5], "big")):
            envelopes.append((trio.current_time(), buffer[0], buffer[5 : 5 + size]))
            buffer = buffer[5 + size :]
    assert buffer == b""
    return envelopes


TEN_TOKENS = {"ttft_ms": 0, "itl_ms": 50, "tokens": 10}


@pytest.mark.parametrize(
    ("content_type", "encode", "decode"),
    [
        (
            "application/connect+json",
            lambda ask: json.dumps(MessageToDict(ask)).encode(),
            lambda payload: json.loads(payload).get("content", ""),
        ),
        (
            "application/grpc-web+proto",
            lambda ask: ask.SerializeToString(),
            lambda payload: pb.ChatChunk.FromString(payload).content,
        ),
    ],
    ids=["connect", "grpc-web"],
)
async def test_connect_and_grpc_web_over_http_1_1_through_nginx(
    server, client, nginx, content_type, encode, decode
):
    """What a browser's fetch speaks, through the HTTP/1.1 port: message by
    message (the first before the model had finished), the same text as a
    direct call, and the end of the stream in the body (flags 0x02 Connect,
    0x80 gRPC-Web trailers)."""
    ask = request("web", simulate=pb.Simulate(**TEN_TOKENS))
    frame = encode(ask)

    async def stream(url: str) -> tuple[httpx.Response, list[tuple[float, int, bytes]]]:
        async with client.stream(
            "POST",
            url + "/refimpl.v1.ChatService/StreamChat",
            content=bytes([0]) + len(frame).to_bytes(4, "big") + frame,
            headers={"content-type": content_type},
        ) as resp:
            return resp, await read_envelopes(resp)

    async with nginx_in_front(server.url) as url:
        resp, via_nginx = await stream(url)
    _, direct = await stream(server.url)
    assert (resp.http_version, resp.status_code) == ("HTTP/1.1", 200)
    texts = ["".join(decode(p) for _, flags, p in envs if flags == 0) for envs in (via_nginx, direct)]
    assert texts[0] == texts[1] != ""
    (*_, (_, end_flags, end)) = via_nginx
    if content_type.startswith("application/connect"):
        assert (end_flags, json.loads(end)) == (0x02, {})
    else:
        assert (end_flags, end) == (0x80, b"grpc-status: 0\r\n")
    trace = await server.trace(resp.headers["x-request-id"])
    assert ended_by(trace)[0] == "done"
    assert via_nginx[0][0] < stamp(trace, "done")  # the first message, before the last token


async def test_sse_over_h2c_through_nginx(server, client, nginx):
    """HTTP/2 from the client to nginx (prior knowledge, no TLS), HTTP/1.1
    from nginx to the server: the same events, token by token, and no
    HTTP/1.1-only headers in the answer (RFC 9113 §8.2.2)."""
    body = chat_body(stream=True, simulate=TEN_TOKENS)
    proxy = nginx_in_front(server.url)
    parser, arrivals = SSEParser(), []
    async with (
        proxy,
        httpx.AsyncClient(http1=False, http2=True, timeout=30) as h2_client,
        h2_client.stream("POST", proxy.h2c_url + "/v1/chat/completions", json=body) as resp,
    ):
        async for chunk in resp.aiter_raw():
            arrivals += [(trio.current_time(), event.data) for event in parser.feed(chunk)]
    assert (resp.http_version, resp.status_code) == ("HTTP/2", 200)
    assert "connection" not in resp.headers
    _, direct = await raw_body(client, server.url, body)
    texts = []
    for events in ([data for _, data in arrivals], [e.data for e in SSEParser().feed(direct)]):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(data) for data in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        texts.append("".join(map(content_of, chunks)))
    assert texts[0] == texts[1] != ""
    trace = await server.trace(resp.headers["x-request-id"])
    first_token = next(at for at, data in arrivals[:-1] if content_of(json.loads(data)))
    assert first_token < stamp(trace, "done")


def content_of(chunk: dict) -> str:
    """The text an SSE chat chunk carries ("" for the role chunk and the last)."""
    return (chunk["choices"] or [{}])[0].get("delta", {}).get("content") or ""


def stamp(trace: dict, name: str) -> float:
    return next(e["at"] for e in trace["events"] if e["name"] == name)


async def ws_turn(url: str, simulate: dict, *, client_pings: bool = False) -> list[str | int]:
    """One chat turn on a WebSocket: the types of the messages received, and
    the close code if the socket closed instead of finishing the turn."""
    seen: list[str | int] = []
    async with open_websocket_url(ws_url(url)) as ws, trio.open_nursery() as nursery:
        if client_pings:
            nursery.start_soon(ping_every, ws, 0.5)
        await ws.send_message(chat(simulate=simulate))
        try:
            while (message := await receive(ws))["type"] == "token":
                seen.append("token")
            seen.append(message["type"])
        except ConnectionClosed as closed:
            seen.append(closed.reason.code)
        nursery.cancel_scope.cancel()
    return seen


async def ping_every(ws, interval: float) -> None:
    """The client's own keepalive (trio-websocket has none): a ping frame
    every ``interval`` seconds, each waiting for its pong."""
    while True:
        await trio.sleep(interval)
        await ws.ping()


async def test_websocket_through_nginx(server, nginx):
    async with nginx_in_front(server.url) as url, open_websocket_url(ws_url(url)) as ws:
        content, done = await turn(ws, max_tokens=7)
        second, _ = await turn(ws, max_tokens=7)  # many turns, one socket
    async with open_websocket_url(ws_url(server.url)) as ws:
        direct, _ = await turn(ws, max_tokens=7)
    assert content == second == direct != ""
    assert (done["type"], done["usage"]["completion_tokens"]) == ("done", 7)


async def test_a_silent_websocket_is_cut_unless_pings_flow(start_server, nginx):
    """proxy_read_timeout 2s, a model silent for 5 s: the tunnel survives if
    bytes cross it, whoever sends the ping."""

    async def case(ws_ping_interval: float | None, client_pings: bool) -> tuple[list, dict]:
        server = await start_server(ws_ping_interval=ws_ping_interval)
        async with nginx_in_front(server.url, read_timeout=READ_TIMEOUT) as url:
            return await run_and_trace(server, partial(ws_turn, url, SILENT_5S, client_pings=client_pings))

    cases = await concurrently(
        quiet=lambda: case(None, False),
        server_pings=lambda: case(1.0, False),
        client_pings=lambda: case(None, True),
    )
    seen, trace = cases["quiet"]
    assert seen == [1006]  # closed with no close frame (RFC 6455 §7.1.5)
    assert ended_by(trace) == ("cancelled", "client_disconnect", 0)
    for name in ["server_pings", "client_pings"]:
        seen, trace = cases[name]
        assert seen[-1] == "done", name
        assert ended_by(trace)[0] == "done", name
    names = [e["name"] for e in cases["server_pings"][1]["events"]]
    assert names.count("heartbeat") >= 2  # each server ping, while the model was silent
    assert "heartbeat" not in [e["name"] for e in cases["client_pings"][1]["events"]]


# ---------------------------------------------------------------------------
# e. a client that leaves: nginx passes the news on


async def test_a_grpc_cancel_through_nginx_cancels_the_generation(server, nginx):
    """grpcio's cancel is an RST_STREAM to nginx, which ends its upstream
    stream; the server hears it at once (SLOW: a token every 200 ms)."""

    def call(url: str) -> str:
        with grpc.insecure_channel(grpc_target(url)) as channel:
            stream = stub_for(channel).StreamChat(request(simulate=SLOW), timeout=30)
            first = next(stream)
            stream.cancel()
            return first.id

    proxy = nginx_in_front(server.url)
    async with proxy:
        gen_id = await trio.to_thread.run_sync(call, proxy.h2c_url)
        gen = server.engine.get(gen_id)
        with trio.fail_after(10):
            await gen.ended.wait()
    name, detail, tokens = ended_by(await server.trace(gen_id))
    assert (name, detail) == ("cancelled", "client_cancel")
    assert tokens < 1000


LONG = {"ttft_ms": 0, "itl_ms": 200, "tokens": 1000}  # 200 s, unless the client leaves


async def test_an_sse_client_that_leaves_through_nginx_cancels_the_generation(server, client, nginx):
    """HTTP/1.1: the client closes its connection after the first token.
    nginx notices, and closes its connection to the server."""
    proxy = nginx_in_front(server.url)
    async with proxy:
        body = chat_body(stream=True, simulate=LONG)
        async with client.stream("POST", proxy.url + "/v1/chat/completions", json=body) as resp:
            gen = server.engine.get(resp.headers["x-request-id"])
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and content_of(json.loads(line[6:])):
                    break  # the first token: leave (httpx closes the connection)
        with trio.fail_after(10):
            await gen.ended.wait()
    name, detail, tokens = ended_by(await server.trace(gen.id))
    assert (name, detail) == ("cancelled", "client_disconnect")
    assert tokens < 1000


async def test_an_h2c_client_that_resets_its_stream_through_nginx_cancels_the_generation(server, nginx):
    """HTTP/2: the client resets its stream (RST_STREAM, RFC 9113 §6.4) and
    keeps the connection open; nginx closes its connection to the server.
    A raw ``h2`` client, because httpx over HTTP/2 sends no reset when a
    stream is left: the generation ran on until the connection closed."""
    proxy = nginx_in_front(server.url)
    async with proxy:
        authority = proxy.h2c_url.removeprefix("http://")
        host, port = authority.rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as sock:
            h2c = H2Client(sock, authority, window=None)
            h2c.request(1, chat_body(stream=True, simulate=LONG))
            with trio.fail_after(10):
                await h2c.until(lambda: text_of(h2c.bodies[1]) != "")  # the first token
            gen = server.engine.get(h2c.ids[1])
            h2c.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            await sock.send_all(h2c.conn.data_to_send())
            with trio.fail_after(10):
                await gen.ended.wait()  # the connection to nginx is still open
    name, detail, tokens = ended_by(await server.trace(gen.id))
    assert (name, detail) == ("cancelled", "client_disconnect")
    assert tokens < 1000


# ---------------------------------------------------------------------------
# f. gRPC and grpc_read_timeout: does anything keep a silent call alive?

#: grpcio's keepalive (gRFC A8): a PING every 500 ms, even with no data.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 500),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
RESET = "Stream removed (RST_STREAM (Received RST_STREAM with error code {}))"
#: nginx's debug log, which shows each HTTP/2 frame it reads ("http2 PING frame").
DEBUG_LOG = ("error_log stderr warn;", "error_log stderr debug;")
#: The client's silence limited (default 60s) instead of the server's.
BODY_TIMEOUT = ("client_max_body_size 0;", f"client_max_body_size 0; client_body_timeout {READ_TIMEOUT}s;")


def idle_bidi_call(url: str) -> tuple[list[str], grpc.RpcError | None]:
    """A bidi ``Chat``: one quick turn, then the client waits for its next
    question in silence, as a chat user does."""
    out, kinds = Outbox(), []
    out.chat(max_tokens=3)
    with grpc.insecure_channel(grpc_target(url)) as channel:
        try:
            for message in stub_for(channel).Chat(iter(out), timeout=30):
                kinds.append(message.WhichOneof("kind"))
        except grpc.RpcError as err:
            return kinds, err
        finally:
            out.close()
    return kinds, None


async def test_a_silent_grpc_call_needs_the_servers_heartbeat(start_server, nginx):
    """The heartbeat question for gRPC (``grpc_read_timeout 2s``, a model
    silent for 5 s).  Client PINGs end at nginx, which answers them; the timer
    watches the upstream connection, so they change nothing: without the
    server's heartbeat (the default ``--heartbeat 15`` is longer than this
    silence) every case is cut, as a reset.  With ``--heartbeat 0.5`` the
    empty chunks keep the upstream busy and the call completes.  (Before the
    server sent its first, id-only chunk at once, the silent case was cut as
    nginx's 504, "while reading response header": connectrpc sends the
    headers with the first message, and no heartbeat could help then.)"""

    async def call(ask: pb.ChatRequest, options: Sequence = (), **config) -> tuple[GrpcOutcome, dict, str]:
        server = await start_server(**config)
        proxy = EditedProxy(server.url, *DEBUG_LOG, read_timeout=READ_TIMEOUT)
        async with proxy:
            client = partial(trio.to_thread.run_sync, stream_call, proxy.h2c_url, ask, options)
            outcome, trace = await run_and_trace(server, client)
        return outcome, trace, proxy.errors

    async def bidi(nginx_for: Callable[[str], NginxProxy]) -> tuple[list[str], grpc.RpcError | None, str]:
        server = await start_server()
        proxy = nginx_for(server.url)
        async with proxy:
            kinds, err = await trio.to_thread.run_sync(idle_bidi_call, proxy.h2c_url)
        return kinds, err, proxy.errors

    silent = request(simulate=pb.Simulate(**SILENT_5S))
    cases = await concurrently(
        silent=lambda: call(silent),
        silent_with_keepalive=lambda: call(silent, KEEPALIVE),
        silent_with_heartbeat=lambda: call(silent, heartbeat=0.5),
        paused=lambda: call(request(simulate=pb.Simulate(**PAUSE_5S))),
        idle_bidi=lambda: bidi(lambda url: NginxProxy(url, read_timeout=READ_TIMEOUT)),
        idle_bidi_client=lambda: bidi(lambda url: EditedProxy(url, *BODY_TIMEOUT, read_timeout=60)),
    )

    for name in ["silent", "silent_with_keepalive"]:
        outcome, trace, errors = cases[name]
        assert outcome.status() == (grpc.StatusCode.INTERNAL, RESET.format(2)), name
        assert [c.content for c in outcome.chunks] == [""], name  # only the id-only first chunk
        assert "upstream timed out" in errors and "while reading upstream" in errors
        assert [e["name"] for e in trace["events"]] == ["accepted", "cancelled"], name
        assert ended_by(trace) == ("cancelled", "client_cancel", 0), name
    # The keepalive PINGs reached nginx, which answered them itself: grpcio
    # sends one PING with a call anyway (a bandwidth probe); measured, three
    # with keepalive before the cut.
    pings = {name: cases[name][2].count("http2 PING frame") for name in ["silent", "silent_with_keepalive"]}
    assert pings["silent_with_keepalive"] > pings["silent"]

    outcome, trace, errors = cases["silent_with_heartbeat"]
    assert outcome.status() == (grpc.StatusCode.OK, "")
    assert outcome.text() == "".join(simulated_text("Hello", 0)[:5])
    beats = [e for e in trace["events"] if e["name"] == "heartbeat"]
    assert beats and len([c for c in outcome.chunks[1:] if not c.content and not c.finish_reason]) == len(
        beats
    )
    assert "upstream timed out" not in errors

    outcome, trace, errors = cases["paused"]
    assert outcome.status() == (grpc.StatusCode.INTERNAL, RESET.format(2))
    assert [c.content != "" for c in outcome.chunks] == [False, True]  # the id, the token before the pause
    assert "upstream timed out" in errors and "while reading upstream" in errors
    assert ended_by(trace) == ("cancelled", "client_cancel", 1)

    # A bidi call between turns: the server's silence (grpc_read_timeout) or
    # the client's (client_body_timeout), whichever limit is shorter.
    kinds, err, errors = cases["idle_bidi"]
    assert kinds[-1] == "done" and (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, RESET.format(2))
    assert "upstream timed out" in errors
    kinds, err, errors = cases["idle_bidi_client"]
    assert kinds[-1] == "done" and (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, RESET.format(1))
    assert "upstream timed out" not in errors


async def test_a_bidi_call_is_one_request_body_for_client_max_body_size(server, nginx):
    """Every message of every turn of a ``Chat`` call is one HTTP request
    body to nginx: four 300 KB questions pass with the shipped config, and
    nginx's default 1m resets the call during the fourth."""
    question = "word " * 60_000

    def call(url: str) -> tuple[int, grpc.RpcError | None]:
        out, done = Outbox(), 0
        out.chat(content=question, max_tokens=2)
        with grpc.insecure_channel(grpc_target(url)) as channel:
            try:
                for message in stub_for(channel).Chat(iter(out), timeout=30):
                    if message.WhichOneof("kind") == "done":
                        done += 1
                        if done < 4:
                            out.chat(content=question, max_tokens=2)
                        else:
                            out.close()
            except grpc.RpcError as err:
                return done, err
            finally:
                out.close()
        return done, None

    async def turns(proxy: NginxProxy) -> tuple[int, grpc.RpcError | None, str]:
        async with proxy:
            done, err = await trio.to_thread.run_sync(call, proxy.h2c_url)
        return done, err, proxy.errors

    cases = await concurrently(
        shipped=lambda: turns(NginxProxy(server.url)),
        default=lambda: turns(EditedProxy(server.url, "client_max_body_size 0;", "")),  # nginx's 1m
    )
    assert cases["shipped"][:2] == (4, None)
    done, err, errors = cases["default"]
    assert done == 3 and err.code() == grpc.StatusCode.INTERNAL
    assert "client intended to send too large chunked body" in errors


# ---------------------------------------------------------------------------
# The module itself: config, start-up, the sync API, the CLI


def test_config_switches():
    def config(**changes):
        settings = {"read_timeout": 2, "gzip": False, "honour_accel_buffering": True} | changes
        return render_config(port=8080, h2c_port=8081, upstream="http://127.0.0.1:8000", **settings)

    assert "{{" not in config()
    assert "listen 127.0.0.1:8080;" in config()
    assert "listen 127.0.0.1:8081 http2;" in config()
    assert "proxy_pass http://127.0.0.1:8000;" in config()
    assert "grpc_pass grpc://127.0.0.1:8000;" in config()
    assert "grpc_read_timeout 1500ms;" in config(read_timeout=1.5)
    assert "proxy_http_version 1.1;" in config()
    assert "proxy_read_timeout 2s;" in config()
    assert "proxy_read_timeout 1500ms;" in config(read_timeout=1.5)
    assert "gzip off;" in config()
    assert "gzip on;" in config(gzip=True)
    assert "# proxy_ignore_headers X-Accel-Buffering;" in config()
    ignoring = config(honour_accel_buffering=False)
    assert "\n            proxy_ignore_headers X-Accel-Buffering;" in ignoring


def test_missing_nginx_names_the_package(monkeypatch):
    monkeypatch.setattr(nginx_proxy.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(NginxNotFound, match="apt-get install nginx"):
        NginxProxy("http://127.0.0.1:8000").start()


async def test_a_port_taken_before_nginx_binds_it_is_retried(server, client, nginx, monkeypatch):
    """Another process takes the port between our probe and nginx's bind."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()  # it accepts connections: only the pid file tells us apart
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        free = nginx_proxy.free_loopback_port
        monkeypatch.setattr(
            nginx_proxy, "free_loopback_port", lambda *besides: next(ports, None) or free(*besides)
        )
        proxy = nginx_in_front(server.url)
        async with proxy as url:
            assert url != f"http://127.0.0.1:{taken}"
            resp = await client.post(url + "/v1/chat/completions", json=chat_body())
            assert resp.json()["usage"]["completion_tokens"] == 24
    assert "Address already in use" in proxy.errors


async def test_a_large_request_body_is_spooled_inside_the_prefix(server, client, nginx):
    """Bodies over client_body_buffer_size go to client_body_temp_path: the
    workers (as root: ``user root``) can write there."""
    proxy = nginx_in_front(server.url)
    async with proxy as url:
        resp = await client.post(url + "/v1/chat/completions", json=chat_body("token " * 20_000))
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] >= 20_000
    assert "a client request body is buffered to a temporary file" in proxy.errors
    assert "/client_body_temp/" in proxy.errors


async def test_blocking_context_manager_as_in_a_notebook(start_server, nginx):
    """A notebook cell under ``%autoawait trio``: ``with`` starts and stops
    nginx (blocking, briefly), ``await record(...)`` streams through it."""
    server = await start_server(heartbeat=60)
    with NginxProxy(server.url, read_timeout=READ_TIMEOUT) as url:
        rec = await record(url, chat_body(simulate={"itl_ms": 10, "tokens": 5}))
    assert rec.ending == "done"
    assert rec.id.startswith("chatcmpl-")
    times = [a.at for a in rec.arrivals]
    assert times == sorted(times) and times[0] >= 0
    # the role chunk, 5 tokens, the chunk with finish_reason, [DONE]
    assert [a.kind for a in rec.arrivals] == ["other"] + ["token"] * 5 + ["other", "done"]
    assert (await server.trace(rec.id))["events"][-1]["name"] == "done"


async def test_cli_runs_until_ctrl_c(server, client, nginx):
    argv = [
        sys.executable,
        "-m",
        "refimpl.examples.nginx_proxy",
        "--upstream",
        server.url,
        "--port",
        "0",
        "--h2c-port",
        "0",
    ]
    proc = await trio.lowlevel.open_process([*argv, "--read-timeout", "2"], stdout=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        url = line.split()[1].decode()  # "nginx: http://127.0.0.1:PORT -> ..."
        async with client.stream("POST", url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
            body = b"".join([chunk async for chunk in resp.aiter_raw()])
        assert body.endswith(b"data: [DONE]\n\n")
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await proc.wait() == 0
        with pytest.raises(httpx.ConnectError):  # nginx is gone with it
            await client.get(url)
    finally:
        if proc.returncode is None:  # the test failed midway
            proc.terminate()  # the CLI stops nginx on SIGTERM too
            await proc.wait()
