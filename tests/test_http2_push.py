"""HTTP/2 server push and 103 Early Hints (refimpl/protocols/http2.py), on real sockets.

The seed article lists "HTTP/2 server push" among the ways to stream.  These
tests show it working, show that browsers turned it off, and show what took
its place:

* a raw ``h2`` client that allows push (h2c, prior knowledge) receives a
  PUSH_PROMISE for ``/static/style.css``, and the pushed bytes are the very
  bytes a plain GET returns;
* a client that sends SETTINGS_ENABLE_PUSH = 0, as every browser now does,
  receives no PUSH_PROMISE and the page still loads; the server did try, and
  its ``h2`` state machine refused on the client's behalf;
* the 103 Early Hints, with the stylesheet's ``Link``, arrives before the 200
  over HTTP/2, and not at all over HTTP/1.1 (hypercorn 0.18 sends none there);
* real Chromium over TLS: it says ENABLE_PUSH = 0 in its own SETTINGS (seen
  by the server at the moment it tries to push), so nothing is pushed, and it
  reports the interim 103 in its navigation timing.

How the server side is watched: ``h2.connection.H2Connection.push_stream`` is
wrapped (``monkeypatch``, this test only) to record the client's
ENABLE_PUSH as the server's connection holds it, and whether the promise
went out.  That is the one call every push passes through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import httpx
import pytest
import trio
from conftest import TEST_SIMULATE
from playwright.sync_api import sync_playwright
from test_demo_page import ARGS, CHROMIUM

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.protocols import http2
from refimpl.tls import local_certificate

PUSH = h2.settings.SettingCodes.ENABLE_PUSH


async def start_push_server(nursery: trio.Nursery, **tls: str) -> str:
    """The app (``create_app`` registers the push demo), with TLS if given."""
    app = create_app(Config(simulate=TEST_SIMULATE))
    return await nursery.start(partial(serve, app, **tls))


@dataclass
class PushAttempt:
    client_enable_push: int  # SETTINGS_ENABLE_PUSH as the server's connection holds it
    sent: bool  # did the PUSH_PROMISE go out?


@pytest.fixture
def push_attempts(monkeypatch) -> list[PushAttempt]:
    attempts: list[PushAttempt] = []
    push_stream = h2.connection.H2Connection.push_stream

    def recorded(self, stream_id, promised_stream_id, request_headers):
        attempt = PushAttempt(self.remote_settings.enable_push, sent=False)
        attempts.append(attempt)
        push_stream(self, stream_id, promised_stream_id, request_headers)  # may raise
        attempt.sent = True

    monkeypatch.setattr(h2.connection.H2Connection, "push_stream", recorded)
    return attempts


@dataclass
class Exchange:
    """Everything a raw h2 client saw for one GET, in order."""

    events: list[h2.events.Event] = field(default_factory=list)

    def of(self, kind: type, stream_id: int) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == stream_id]

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, stream_id))

    def headers(self, kind: type, stream_id: int) -> dict[str, str]:
        (event,) = self.of(kind, stream_id)
        return dict(event.headers)

    @property
    def pushes(self) -> list[h2.events.PushedStreamReceived]:
        return [e for e in self.events if isinstance(e, h2.events.PushedStreamReceived)]


async def h2_get(url: str, path: str, *, enable_push: bool) -> Exchange:
    """GET ``path`` over h2c (prior knowledge) and read until every stream,
    pushed ones included, has ended."""
    authority = url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config)
    # The first SETTINGS frame carries the client's choice, as a browser's does.
    conn.local_settings = h2.settings.Settings(client=True, initial_values={PUSH: int(enable_push)})
    conn.initiate_connection()
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", authority)]
    conn.send_headers(1, headers, end_stream=True)
    seen, open_streams = Exchange(), {1}
    sock = await trio.open_tcp_stream(host, int(port))
    async with sock:
        await sock.send_all(conn.data_to_send())
        with trio.fail_after(10):  # a hang guard, not a timing
            while open_streams:
                data = await sock.receive_some(65536)
                assert data, "the server closed the connection"
                for event in conn.receive_data(data):
                    seen.events.append(event)
                    if isinstance(event, h2.events.PushedStreamReceived):
                        open_streams.add(event.pushed_stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        open_streams.discard(event.stream_id)
                await sock.send_all(conn.data_to_send())
        conn.close_connection()
        await sock.send_all(conn.data_to_send())
    return seen


async def test_push_delivers_the_stylesheet_a_get_would(nursery, push_attempts):
    url = await start_push_server(nursery)
    seen = await h2_get(url, http2.PUSH_DEMO, enable_push=True)

    (push,) = seen.pushes
    assert push.parent_stream_id == 1 and push.pushed_stream_id % 2 == 0  # server streams are even
    promised = dict(push.headers)  # the request the server made up for the client
    assert (promised[":method"], promised[":path"]) == ("GET", http2.STYLESHEET)
    # RFC 9113 §8.4: the promise comes before the response that needs it.
    promise_at = seen.events.index(push)
    assert promise_at < seen.events.index(seen.of(h2.events.ResponseReceived, 1)[0])

    pushed = push.pushed_stream_id
    assert seen.headers(h2.events.ResponseReceived, pushed)[":status"] == "200"
    async with httpx.AsyncClient() as client:
        plain = await client.get(url + http2.STYLESHEET)
    assert plain.status_code == 200 and plain.content  # a real file, not an empty one
    assert seen.body(pushed) == plain.content
    assert seen.headers(h2.events.ResponseReceived, pushed)["content-type"] == plain.headers["content-type"]

    assert seen.headers(h2.events.ResponseReceived, 1)[":status"] == "200"
    assert b"promised to push /static/style.css" in seen.body(1)
    assert push_attempts == [PushAttempt(client_enable_push=1, sent=True)]


async def test_a_client_that_refuses_push_gets_the_page_without_it(nursery, push_attempts):
    url = await start_push_server(nursery)
    seen = await h2_get(url, http2.PUSH_DEMO, enable_push=False)  # what browsers send

    assert seen.pushes == []
    assert seen.headers(h2.events.ResponseReceived, 1)[":status"] == "200"
    assert seen.body(1).startswith(b"<!doctype html>")
    assert {e.stream_id for e in seen.events if hasattr(e, "stream_id")} <= {0, 1}  # no other stream
    # The app did ask; the server's h2 refused (ProtocolError), and hypercorn
    # dropped the push without a word to the app or the client.
    assert push_attempts == [PushAttempt(client_enable_push=0, sent=False)]


async def test_early_hints_arrive_before_the_response_over_http2(nursery):
    url = await start_push_server(nursery)
    seen = await h2_get(url, http2.PUSH_DEMO, enable_push=False)

    (hint,) = seen.of(h2.events.InformationalResponseReceived, 1)
    (final,) = seen.of(h2.events.ResponseReceived, 1)
    assert seen.events.index(hint) < seen.events.index(final)
    assert dict(hint.headers)[":status"] == "103"
    assert [v for k, v in hint.headers if k == "link"] == [http2.PRELOAD]
    assert dict(final.headers)["link"] == http2.PRELOAD  # the answer repeats the advice


async def test_no_early_hints_over_http11(nursery):
    """hypercorn 0.18 offers the early-hint extension on HTTP/2 and 3 only
    (and its h11 protocol drops 1xx events): an HTTP/1.1 client sees the 200
    first, with the ``Link`` header as the only hint."""
    url = await start_push_server(nursery)
    authority = url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=http2.PUSH_DEMO, headers=[("Host", authority)])
    seen: list[h11.Event] = []
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        await sock.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        with trio.fail_after(10):
            while not seen or not isinstance(seen[-1], h11.EndOfMessage):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await sock.receive_some(65536))
                else:
                    seen.append(event)
    assert not [e for e in seen if isinstance(e, h11.InformationalResponse)]
    response = seen[0]
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert dict(response.headers)[b"link"] == http2.PRELOAD.encode()
    body = b"".join(e.data for e in seen if isinstance(e, h11.Data))
    assert b"HTTP/1.1 has no server push" in body


def chromium_loads(url: str) -> dict:
    """Open the push demo in headless Chromium; what the page itself can see."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            response = page.goto(url + http2.PUSH_DEMO)
            timing = page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
            return {
                "status": response.status,
                "protocol": timing["nextHopProtocol"],
                "interim": timing["firstInterimResponseStart"],
                "final": timing["finalResponseHeadersStart"],
                "text": page.text_content("#push"),
                # style.css sets the body's max-width: the stylesheet arrived.
                "styled": page.evaluate("getComputedStyle(document.body).maxWidth"),
            }
        finally:
            browser.close()


async def test_chromium_refuses_push_and_receives_the_103(nursery, tmp_path, push_attempts):
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat before the test)
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    tls = local_certificate(tmp_path)
    url = await start_push_server(nursery, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    with trio.fail_after(60):
        seen = await trio.to_thread.run_sync(partial(chromium_loads, url), abandon_on_cancel=True)

    assert (seen["status"], seen["protocol"]) == (200, "h2")  # HTTP/2, by ALPN
    assert "promised to push" in seen["text"]  # the app asked for a push
    # Chromium's own SETTINGS said ENABLE_PUSH = 0, so nothing went out.
    assert push_attempts and all(a == PushAttempt(client_enable_push=0, sent=False) for a in push_attempts)
    # It did receive an interim response (our 103) before the final headers.
    assert 0 < seen["interim"] <= seen["final"]
    assert seen["styled"] == "896px"  # and it fetched the stylesheet itself
