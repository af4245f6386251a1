"""A real model upstream (``refimpl/upstream.py``, lesson 14), against a second
``refimpl serve`` process over real HTTP.

Our server runs in the test's process (``start_server(upstream=...)``), so
the test can read its engine and traces; the upstream is a subprocess
(``upstream_fixtures.py``) whose traces we read over HTTP, by the id its
chunks carry.  Nothing sleeps to synchronise: a test waits for an event of
the stream it reads, or polls a trace under a generous ``trio.fail_after``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import trio
from upstream_fixtures import (  # noqa: F401  (fixtures: see upstream_fixtures.py)
    KEY_ENV,
    UPSTREAM_AUTH,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    garbage_upstream,
    start_upstream_fixture,
    upstream_fixture,
)

from refimpl.examples.cluster import Worker
from refimpl.examples.nginx_proxy import free_loopback_port
from refimpl.grpc_client import stream_chat as grpc_stream_chat
from refimpl.sse import SSEParser
from refimpl.upstream import CHANNEL_TOKENS
from refimpl.ws_client import connect as ws_connect

#: Between two looks at the upstream's trace (a poll, not a synchronising sleep).
POLL = 0.02
MESSAGES = [{"role": "user", "content": "Why should tokens stream?"}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": UPSTREAM_MODEL, "messages": MESSAGES, "stream": True, **extra}


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where our server finds the upstream's key (``--upstream-key-env``)."""
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)


async def proxy(start_server, upstream_url: str, **settings: Any):
    """Our server, streaming from ``upstream_url`` with its key."""
    return await start_server(upstream=upstream_url + "/v1", upstream_key_env=KEY_ENV, **settings)


def is_token(kind: str, data: str) -> bool:
    """A content chunk (not the role chunk, whose content is empty)."""
    return kind == "message" and '"content":"' in data and '"role"' not in data


def is_comment(kind: str, data: str) -> bool:
    return kind == "comment"


async def read_events(
    chunks: AsyncIterator[bytes], until: Callable[[str, str], bool] | None = None
) -> list[tuple[str, str]]:
    """The (type, data) of each SSE event, and ``("comment", "")`` for a
    ``: ping``; stops after the first event that ``until`` accepts."""
    parser, out = SSEParser(), []
    async for raw in chunks:
        if raw.startswith(b":") or b"\n:" in raw:
            out.append(("comment", ""))
        out += [(event.type, event.data) for event in parser.feed(raw)]
        if until is not None and any(until(kind, data) for kind, data in out):
            break
    return out


async def upstream_trace(worker: Worker, gen_id: str, *, finished: bool = True) -> dict:
    """The upstream's own trace of ``gen_id`` (once it has ended)."""
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            while True:
                trace = (await client.get(f"{worker.url}/v1/debug/generations/{gen_id}")).json()
                assert "events" in trace, (gen_id, trace)
                if not finished or trace["events"][-1]["name"] in ("done", "error", "cancelled"):
                    return trace
                await trio.sleep(POLL)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- the happy path: what the client sees is what the upstream said ---------
async def test_openai_sdk_through_the_proxy_equals_the_upstream(upstream, start_server):
    ours = await proxy(start_server, upstream.url)

    async def ask(url: str) -> tuple[str, Any, str, Any]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=UPSTREAM_KEY, max_retries=0)
        stream = await client.chat.completions.create(
            model=UPSTREAM_MODEL,
            messages=MESSAGES,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        full = await client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, seed=7)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert text == full.choices[0].message.content and chunks[-1].usage == full.usage
        return text, chunks[-1].usage, finish, full.choices[0].finish_reason

    direct, proxied = await ask(upstream.url), await ask(ours.url)
    assert proxied == direct
    assert direct[1].completion_tokens == 24 and direct[2] == "stop"


async def test_max_tokens_stop_and_seed_reach_the_upstream(upstream, start_server, client):
    ours = await proxy(start_server, upstream.url)
    ask = body(max_tokens=5, seed=3, stream_options={"include_usage": True})
    direct_url = f"{upstream.url}/v1/chat/completions"
    async with client.stream("POST", direct_url, json=ask, headers=UPSTREAM_AUTH) as resp:
        direct = await read_events(resp.aiter_raw())
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        proxied = await read_events(resp.aiter_raw())
    chunks = [json.loads(d) for _, d in proxied if d.startswith("{")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]] == [
        c["choices"][0]["delta"].get("content")
        for c in map(json.loads, (d for _, d in direct if d.startswith("{")))
        if c["choices"]
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and proxied[-1][1] == "[DONE]"


# -- heartbeats, cancellation ----------------------------------------------
async def test_heartbeats_while_the_upstream_is_silent(upstream, start_server, client):
    """The upstream takes a minute to its first token; our client hears
    ``: ping`` meanwhile (the engine's wait times out on a cancel-safe
    channel receive), and no token is lost to those timeouts."""
    ours = await proxy(start_server, upstream.url, heartbeat=0.05)
    ask = body(simulate={"ttft_ms": 60_000})
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        gen_id = resp.headers["x-request-id"]
        events = await read_events(resp.aiter_raw(), until=is_comment)
    assert events[-1] == ("comment", "")
    names = [e["name"] for e in (await ours.trace(gen_id))["events"]]
    assert "heartbeat" in names and "first_token" not in names


async def test_client_disconnect_cancels_the_upstream_generation(upstream, start_server, client):
    """We close the upstream request the moment our client leaves: the
    upstream's own trace ends ``cancelled(client_disconnect)``."""
    ours = await proxy(start_server, upstream.url)
    backend = ours.engine.backend
    ask = body(simulate={"itl_ms": 600_000})  # one token, then a long wait
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        gen_id = resp.headers["x-request-id"]
        await read_events(resp.aiter_raw(), until=is_token)
        (stream,) = backend.in_flight
        theirs = stream.upstream_id
    ours_gen = ours.engine.get(gen_id)
    with trio.fail_after(10):
        await ours_gen.ended.wait()
    assert ours_gen.trace.events[-1].name == "cancelled"
    trace = await upstream_trace(upstream, theirs)
    last = trace["events"][-1]
    assert (last["name"], last["detail"]) == ("cancelled", "client_disconnect")
    assert not backend.in_flight


async def test_a_client_that_stops_reading_pauses_the_upstream(upstream, start_server, client):
    """Backpressure across the hop: our client stops reading; our writes
    block, our writer stops pulling, the stream's bounded channel fills, its
    task stops reading the upstream's socket, and TCP makes the upstream's
    writes block: its own paused-streams gauge says so, and it never makes
    the million tokens it was asked for."""
    ours = await proxy(start_server, upstream.url)
    ask = body(simulate={"tokens": 1_000_000})
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        chunks = resp.aiter_raw()  # kept: a dropped iterator closes the response
        await read_events(chunks, until=is_token)  # then we read no more
        (stream,) = ours.engine.backend.in_flight
        # Our write to the client blocked (it stays so: nobody reads), our
        # channel is full, and the upstream is held back.  Then, all stable:
        with trio.fail_after(20):
            while True:
                if (
                    await gauge(ours.url, "refimpl_paused_streams") >= 1
                    and stream.buffered == CHANNEL_TOKENS
                    and await gauge(upstream.url, "refimpl_paused_streams") >= 1
                ):
                    break
                await trio.sleep(POLL)
        assert stream.buffered == CHANNEL_TOKENS  # and no more: bounded
    trace = await upstream_trace(upstream, stream.upstream_id)
    assert "paused" in [e["name"] for e in trace["events"]]
    assert trace["completion_tokens"] < 1_000_000


async def gauge(url: str, name: str) -> float:
    """A gauge from a server's ``/metrics`` (the upstream wants its key)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics", headers=UPSTREAM_AUTH)).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# -- failures: each one our documented error event, then a clean end ---------
async def test_upstream_killed_mid_stream(start_upstream, start_server, client, caplog):
    worker = await start_upstream()
    ours = await proxy(start_server, worker.url)
    ask = body(simulate={"itl_ms": 600_000})
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        chunks = resp.aiter_raw()
        first = await read_events(chunks, until=is_token)
        worker.kill()
        rest = await read_events(chunks)  # ends: the body closes cleanly
    assert any(is_token(k, d) for k, d in first)
    kind, data = rest[-1]
    assert kind == "error" and json.loads(data)["error"]["code"] == "upstream_error"
    assert "[DONE]" not in [d for _, d in rest]
    no_tracebacks(caplog)


async def test_upstream_that_stops_sending_times_out(upstream, start_server, client):
    """One token, then silence (its own heartbeat is 15 s away): after
    ``--upstream-timeout`` our client gets ``upstream_timeout``."""
    ours = await proxy(start_server, upstream.url, upstream_timeout=0.3)
    ask = body(simulate={"itl_ms": 600_000})
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        events = await read_events(resp.aiter_raw())
    kind, data = events[-1]
    assert kind == "error" and json.loads(data)["error"]["code"] == "upstream_timeout"
    assert json.loads(data)["error"]["type"] == "server_error"


async def test_upstream_error_event_becomes_ours(upstream, start_server, client):
    """The upstream's own ``event: error`` after 3 tokens: those 3 reach the
    client, then our ``upstream_error`` quoting the upstream's code."""
    ours = await proxy(start_server, upstream.url)
    ask = body(simulate={"fail_after_tokens": 3, "fail_with": "overloaded"})
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=ask) as resp:
        events = await read_events(resp.aiter_raw())
    contents = [d for k, d in events if is_token(k, d)]
    assert len(contents) == 3
    error = json.loads(events[-1][1])["error"]
    assert events[-1][0] == "error" and error["code"] == "upstream_error" and "overloaded" in error["message"]


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: {oops\n\n',
            True,
            id="data-not-json",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\n\r\n<html>hello</html>",
            True,
            id="not-an-event-stream",
        ),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True, id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + b"x" * (1 << 20 | 4096),
            False,
            id="endless-line",
        ),
    ],
)
async def test_garbage_from_the_upstream(answer, close, nursery, start_server, client, caplog):
    url = await garbage_upstream(nursery, answer, close=close)
    ours = await proxy(start_server, url, upstream_timeout=30)
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=body()) as resp:
        assert resp.status_code == 200
        events = await read_events(resp.aiter_raw())
    kind, data = events[-1]
    assert kind == "error" and json.loads(data)["error"]["code"] == "upstream_error"
    no_tracebacks(caplog)


# -- before the upstream's stream starts ------------------------------------
async def test_upstream_down_before_the_stream(start_server, client, caplog):
    """Nothing listens there: a non-streamed request gets our 503 (the
    status line is still ours), a streamed one its 200, the role chunk, and
    then the error event; ``/v1/models`` says 503 too."""
    ours = await proxy(start_server, f"http://127.0.0.1:{free_loopback_port()}")
    resp = await client.post(f"{ours.url}/v1/chat/completions", json=body(stream=False))
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
    assert "retry-after" in resp.headers
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=body()) as resp:
        assert resp.status_code == 200
        events = await read_events(resp.aiter_raw())
    assert [k for k, _ in events] == ["message", "error"]
    assert json.loads(events[-1][1])["error"]["code"] == "upstream_unavailable"
    resp = await client.get(f"{ours.url}/v1/models")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
    no_tracebacks(caplog)


async def test_bad_upstream_key_is_a_clear_error(upstream, start_server, client, monkeypatch):
    """The upstream says 401 to our key: that is our misconfiguration, not
    the client's, so the client gets 502 naming the variable to fix."""
    monkeypatch.setenv(KEY_ENV, "sk-a-wrong-key")
    ours = await proxy(start_server, upstream.url)
    resp = await client.post(f"{ours.url}/v1/chat/completions", json=body(stream=False))
    error = resp.json()["error"]
    assert resp.status_code == 502 and error["code"] == "upstream_error"
    assert f"${KEY_ENV}" in error["message"] and "401" in error["message"]


# -- the model list, and the other protocols ---------------------------------
async def test_models_reflect_the_upstream(upstream, tmp_path, client):
    """``refimpl serve --upstream URL --upstream-key-env VAR`` (the command
    users run): our ``/v1/models`` is the upstream's; its model is
    accepted, the simulated one's name is not."""
    serve = [sys.executable, "-m", "refimpl", "serve", "--port", "0", "--quiet"]
    worker = Worker(
        [*serve, "--upstream", upstream.url + "/v1", "--upstream-key-env", KEY_ENV], tmp_path / "log"
    )
    try:
        await trio.to_thread.run_sync(worker.wait_ready)
        ids = [m["id"] for m in (await client.get(f"{worker.url}/v1/models")).json()["data"]]
        assert ids == [UPSTREAM_MODEL]
        ok = await client.post(f"{worker.url}/v1/chat/completions", json=body(stream=False))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 24
        wrong = await client.post(
            f"{worker.url}/v1/chat/completions", json={**body(), "model": "refimpl-sim"}
        )
        assert wrong.status_code == 404 and UPSTREAM_MODEL in wrong.json()["error"]["message"]
    finally:
        worker.kill()


async def test_websocket_and_grpc_through_the_upstream(upstream, start_server, client):
    ours = await proxy(start_server, upstream.url)
    url = f"{upstream.url}/v1/chat/completions"
    direct = (await client.post(url, json=body(stream=False), headers=UPSTREAM_AUTH)).json()
    text = direct["choices"][0]["message"]["content"]
    async with ws_connect(ours.url) as ws:
        events = [e async for e in ws.chat(MESSAGES)]
    assert "".join(e.content for e in events) == text
    assert events[-1].type == "done" and events[-1].usage == direct["usage"]
    async with grpc_stream_chat(ours.url, body()) as chunks:
        got = [c async for c in chunks]
    assert "".join(c.content for c in got) == text and got[-1].usage == direct["usage"]
