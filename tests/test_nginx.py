"""A real nginx between a real client and a real server (lesson 08, issue 8).

Each test starts refimpl servers in the test's nursery and nginx 1.22 in
front of them (``refimpl/examples/nginx_proxy.py``, config from
``nginx.conf``), then reads the stream through nginx with
:func:`refimpl.figures.record`, which notes when each event arrived and in
which read.  The server runs in this process on the same trio clock, so a
client-side arrival (``rec.started + arrival.at``) and a stamp in the
server's trace (``GET /v1/debug/generations/{id}``) can be compared: the
assertions are about *order* (did the client have a token before the model
had finished?), never about how many seconds something took.  Independent
cases run concurrently, so the file waits on real time for about one 5 s
silence, once.

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
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio
from conftest import Server, chat_body

from refimpl.client import StreamError, stream_chat
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
from refimpl.sse import SSEParser

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


class Http10Proxy(NginxProxy):
    """The config with nginx's default upstream protocol put back."""

    def config(self, port: int) -> str:
        fixed = super().config(port)
        assert "proxy_http_version 1.1;" in fixed
        return fixed.replace("proxy_http_version 1.1;", "proxy_http_version 1.0;")


async def test_with_http_1_0_upstream_a_finished_stream_stays_open_until_the_read_timeout(server, nginx):
    proxy = Http10Proxy(server.url, read_timeout=READ_TIMEOUT)
    async with proxy as url:
        rec = await record(url, chat_body(), timeout=30)
    case = Case(rec, await server.trace(rec.id), proxy.errors)
    assert rec.arrivals[-1].kind == "done"  # everything arrived ...
    assert len(case.tokens()) == 24
    assert (rec.ending, rec.error) == ("cut", CUT)  # ... then the read timeout
    assert "upstream timed out" in case.nginx_errors
    assert case.names[-1] == "done"


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
# The module itself: config, start-up, the sync API, the CLI


def test_config_switches():
    def config(**changes):
        settings = {"read_timeout": 2, "gzip": False, "honour_accel_buffering": True} | changes
        return render_config(port=8080, upstream="http://127.0.0.1:8000", **settings)

    assert "{{" not in config()
    assert "listen 127.0.0.1:8080;" in config()
    assert "proxy_pass http://127.0.0.1:8000;" in config()
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
        monkeypatch.setattr(nginx_proxy, "free_loopback_port", lambda: next(ports, None) or free())
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
    argv = [sys.executable, "-m", "refimpl.examples.nginx_proxy", "--upstream", server.url, "--port", "0"]
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
