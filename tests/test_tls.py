"""HTTPS and HTTP/2 by ALPN (`refimpl serve --tls`, refimpl/tls.py), with real TLS.

A certificate from a throw-away local CA (trustme), the real server, and
httpx negotiating HTTP/2 in the TLS handshake: many SSE streams share one
TCP connection (HTTP/2 multiplexing), each with its own flow, and every one
of them is whole.  The command line prints which CA file a client trusts.
"""

from __future__ import annotations

import json
import signal
import ssl
import sys
from functools import partial

import httpx
import trio
from conftest import TEST_SIMULATE, Server, chat_body
from test_cli import start_serve

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.model import simulated_text, simulated_token
from refimpl.sse import SSEParser
from refimpl.tls import local_certificate

STREAMS = 20


async def start_tls_server(nursery: trio.Nursery, tmp_path) -> tuple[Server, ssl.SSLContext]:
    tls = local_certificate(tmp_path)
    app = create_app(Config(simulate=TEST_SIMULATE))
    url = await nursery.start(partial(serve, app, certfile=str(tls.certfile), keyfile=str(tls.keyfile)))
    assert url.startswith("https://127.0.0.1:")
    return Server(url, app), ssl.create_default_context(cafile=str(tls.ca))


def one_connection(trust: ssl.SSLContext) -> httpx.AsyncClient:
    """HTTP/2 only if ALPN agrees on it; one TCP connection at most, so HTTP/1.1
    could run the streams only one after another."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(http2=True, verify=trust, limits=limits, timeout=10)


async def test_many_sse_streams_share_one_http2_connection(nursery, tmp_path):
    server, trust = await start_tls_server(nursery, tmp_path)
    all_started = trio.Event()
    started: list[str] = []
    versions: set[str] = set()

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        body = chat_body(
            f"stream {i}", stream=True, simulate={"tokens": 1_000_000, "ttft_ms": 0, "itl_ms": 10}
        )
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            versions.add(resp.http_version)
            async for _ in resp.aiter_raw():
                started.append(resp.headers["x-request-id"])
                if len(started) == STREAMS:
                    all_started.set()
                await all_started.wait()
                return  # leaving closes this one stream, not the connection

    async with one_connection(trust) as client, trio.open_nursery() as streams:
        for i in range(STREAMS):
            streams.start_soon(stream, client, i)
        with trio.fail_after(10):
            await all_started.wait()
        # All twenty generations are running at once over the one connection.
        assert len(server.engine.active) == STREAMS
    assert versions == {"HTTP/2"}


async def test_every_multiplexed_stream_is_whole(nursery, tmp_path):
    server, trust = await start_tls_server(nursery, tmp_path)
    texts: dict[int, str] = {}

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        body = chat_body(f"whole {i}", stream=True, simulate={"tokens": 150, "ttft_ms": 0, "itl_ms": 0})
        resp = await client.post(server.url + "/v1/chat/completions", json=body)
        assert resp.http_version == "HTTP/2" and resp.status_code == 200
        parser = SSEParser()
        events = [e.data for e in parser.feed(resp.content) + parser.close()]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(data) for data in events[:-1]]
        texts[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    async with one_connection(trust) as client, trio.open_nursery() as streams:
        for i in range(STREAMS):
            streams.start_soon(stream, client, i)
    for i in range(STREAMS):
        text = simulated_text(f"whole {i}", 0)
        assert texts[i] == "".join(simulated_token(text, n) for n in range(150))


async def test_refimpl_serve_tls_says_what_to_trust():
    proc, url = await start_serve("--tls", "--quiet")
    try:
        assert url.startswith("https://127.0.0.1:")
        welcome = b""
        with trio.fail_after(10):
            while b"clients trust " not in welcome or not welcome.endswith(b"\n"):
                welcome += await proc.stdout.receive_some(4096)
        ca = welcome.split(b"clients trust ")[1].split()[0].decode()
        assert f"curl -N --cacert {ca} {url}/v1/chat/completions".encode() in welcome
        async with httpx.AsyncClient(http2=True, verify=ssl.create_default_context(cafile=ca)) as client:
            resp = await client.get(url + "/v1/models")
        assert (resp.status_code, resp.http_version) == (200, "HTTP/2")
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0


async def test_tls_flags_that_do_not_go_together():
    for flags, says in [
        (["--certfile", "x.pem"], b"either --tls, or both --certfile and --keyfile"),
        (["--tls", "--certfile", "x.pem", "--keyfile", "k.pem"], b"either --tls, or both"),
        (["--tls", "--workers", "2"], b"TLS with --workers is not supported yet"),
    ]:
        result = await trio.run_process(
            [sys.executable, "-m", "refimpl", "serve", *flags], capture_stderr=True, check=False
        )
        assert result.returncode == 2 and says in result.stderr, (flags, result.stderr)


async def test_grpc_over_tls_with_the_local_ca(nursery, tmp_path, monkeypatch):
    """grpcio's secure channel (ALPN h2) trusting the CA ``refimpl serve --tls``
    prints, through ``refimpl chat --protocol grpc``'s client: SSL_CERT_FILE."""
    from refimpl.grpc_client import stream_chat

    server, _ = await start_tls_server(nursery, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    body = chat_body("over TLS")
    async with stream_chat(server.url, body) as events:
        chunks = [event async for event in events]
    assert "".join(c.content for c in chunks) == "".join(simulated_text("over TLS", 0)[:24])
    assert chunks[-1].usage["completion_tokens"] == 24
