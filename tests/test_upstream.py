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
import trio.testing
from upstream_fixtures import (  # noqa: F401  (fixtures: see upstream_fixtures.py)
    KEY_ENV,
    UPSTREAM_AUTH,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    garbage_upstream,
    start_upstream_fixture,
    upstream_fixture,
)

from refimpl.app import create_app, serve
from refimpl.backend import ModelRequest
from refimpl.config import Config
from refimpl.engine import FINISHED, SILENT
from refimpl.examples.cluster import Worker
from refimpl.examples.nginx_proxy import free_loopback_port
from refimpl.grpc_client import stream_chat as grpc_stream_chat
from refimpl.patterns.errors import APIError
from refimpl.sse import SSEParser
from refimpl.upstream_stream import CHANNEL_TOKENS
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


def is_role(kind: str, data: str) -> bool:
    return kind == "message" and '"role"' in data


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
    ("answer", "close", "started"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: {oops\n\n',
            True,
            True,
            id="data-not-json",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\n\r\n<html>hello</html>",
            True,
            False,
            id="not-an-event-stream",
        ),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True, False, id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + b"x" * (1 << 20 | 4096),
            False,
            True,
            id="endless-line",
        ),
    ],
)
async def test_garbage_from_the_upstream(answer, close, started, nursery, start_server, client, caplog):
    url = await garbage_upstream(nursery, answer, close=close)
    ours = await proxy(start_server, url, upstream_timeout=30)
    async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=body()) as resp:
        if resp.status_code == 200:  # the upstream's stream had started: an error event
            kind, data = (await read_events(resp.aiter_raw()))[-1]
        else:  # it never started (not HTTP, not an event stream): our own status line
            kind, data = "error", (await resp.aread()).decode()
    assert (resp.status_code, kind) == (200 if started else 502, "error")
    assert json.loads(data)["error"]["code"] == "upstream_error"
    no_tracebacks(caplog)


# -- before the upstream's stream starts ------------------------------------
async def test_upstream_down_before_the_stream(start_server, client, caplog):
    """Nothing listens there: a request gets our 503 before any stream
    starts (``Generation.opened``), streamed or not, resumable or not, in
    each dialect (Anthropic's in its own shape); ``/v1/models`` says 503 too."""
    ours = await proxy(start_server, f"http://127.0.0.1:{free_loopback_port()}")
    for extra in ({"stream": False}, {}, {"resumable": True}):
        resp = await client.post(f"{ours.url}/v1/chat/completions", json=body(**extra))
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
        assert "retry-after" in resp.headers and "x-request-id" in resp.headers
        trace = await ours.trace(resp.headers["x-request-id"])
        assert trace["events"][-1]["name"] == "error"
    model = body()["model"]
    messages = [{"role": "user", "content": "hi"}]
    resp = await client.post(f"{ours.url}/v1/responses", json={"model": model, "input": "hi", "stream": True})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unavailable"
    resp = await client.post(
        f"{ours.url}/v1/messages",
        json={"model": model, "max_tokens": 5, "messages": messages, "stream": True},
    )
    assert resp.status_code == 503 and resp.json()["type"] == "error"
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


async def test_the_other_dialects_through_the_upstream(upstream, start_server, client):
    """``/v1/messages`` and ``/v1/responses`` accept the upstream's model name
    and say what the upstream wrote, with its usage."""
    ours = await proxy(start_server, upstream.url)
    url = f"{upstream.url}/v1/chat/completions"
    direct = (await client.post(url, json=body(stream=False), headers=UPSTREAM_AUTH)).json()
    text, usage = direct["choices"][0]["message"]["content"], direct["usage"]
    ask = {"model": UPSTREAM_MODEL, "messages": MESSAGES, "max_tokens": 1000}
    message = (await client.post(f"{ours.url}/v1/messages", json=ask)).json()
    assert message["content"][0]["text"] == text
    assert message["usage"]["output_tokens"] == usage["completion_tokens"]
    prompt = MESSAGES[0]["content"]
    response = (
        await client.post(f"{ours.url}/v1/responses", json={"model": UPSTREAM_MODEL, "input": prompt})
    ).json()
    assert response["output"][0]["content"][0]["text"] == text
    assert response["usage"]["output_tokens"] == usage["completion_tokens"]


async def test_a_websocket_clients_simulate_reaches_the_upstream(upstream, start_server):
    """A WebSocket ``chat`` message's ``simulate`` is passed on like an SSE
    request's: the upstream makes 5 tokens, not its default 24."""
    ours = await proxy(start_server, upstream.url)
    async with ws_connect(ours.url) as ws:
        events = [e async for e in ws.chat(MESSAGES, simulate={"tokens": 5})]
    assert events[-1].type == "done" and events[-1].usage["completion_tokens"] == 5


# -- Generation.opened: the upstream's answer before ours starts -------------
def model_request(**changes: Any) -> ModelRequest:
    return ModelRequest(
        **{"messages": (("user", "Why should tokens stream?"),), "model": UPSTREAM_MODEL, **changes}
    )


def answer_500() -> bytes:
    said = b'{"error": {"message": "the GPU caught fire", "code": null}}'
    head = (
        f"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {len(said)}"
    )
    return head.encode() + b"\r\nconnection: close\r\n\r\n" + said


@pytest.mark.parametrize(
    ("where", "model", "status", "code", "words"),
    [
        ("refused", UPSTREAM_MODEL, 503, "upstream_unavailable", "cannot be reached"),
        ("bad-key", UPSTREAM_MODEL, 502, "upstream_error", f"${KEY_ENV} (401"),
        ("upstream", "no-such-model", 400, "upstream_rejected", "(404: "),
        ("500", UPSTREAM_MODEL, 502, "upstream_error", "(500: the GPU caught fire)"),
    ],
)
async def test_opened_raises_the_status_of_an_upstream_that_never_streams(
    where, model, status, code, words, upstream, nursery, start_server, monkeypatch, caplog
):
    """What a streamed route gets from ``await gen.opened(heartbeat, headers)``
    before its own 200: the status a non-streamed request gets, and the
    generation ended ``error(code)``."""
    url = {
        "refused": f"http://127.0.0.1:{free_loopback_port()}",
        "bad-key": upstream.url,
        "upstream": upstream.url,
        "500": await garbage_upstream(nursery, answer_500()) if where == "500" else "",
    }[where]
    if where == "bad-key":
        monkeypatch.setenv(KEY_ENV, "sk-a-wrong-key")
    ours = await proxy(start_server, url)
    gen = ours.engine.start(model_request(model=model), "sse")
    with pytest.raises(APIError) as refused:
        await gen.opened(60, {"X-Request-Id": gen.id})
    err = refused.value
    assert (err.status, err.code) == (status, code) and words in err.message, err.message
    assert (err.retry_after is not None) == (status == 503)
    assert err._headers == {"X-Request-Id": gen.id}
    assert (gen.trace.events[-1].name, gen.trace.events[-1].detail) == ("error", code)
    no_tracebacks(caplog)


async def test_opened_returns_once_the_upstream_streams(upstream, start_server):
    ours = await proxy(start_server, upstream.url)
    gen = ours.engine.start(model_request(), "sse")
    await gen.opened(60)
    assert not gen.finished and gen.trace.names() == ["accepted"]  # answered; no token yet
    tokens = []
    while (step := await gen.pull()) is not FINISHED:
        tokens += step
    assert len(tokens) == 24 and gen.finish_reason == "stop"


async def test_opened_waits_no_longer_than_its_bound(nursery, start_server):
    """An upstream that takes the connection and says nothing: ``opened``
    gives up after its ``timeout`` (the route then answers 200 and
    heartbeats), and the generation goes on."""
    ours = await proxy(start_server, await garbage_upstream(nursery, b"", close=False))
    gen = ours.engine.start(model_request(), "sse")
    await gen.opened(0.05)
    assert not gen.finished
    assert await gen.pull(timeout=0.05) is SILENT  # still waiting: a heartbeat's turn
    gen.cancel("client_disconnect")


async def test_opened_does_not_wait_for_a_queued_generation(upstream, start_server):
    """Queued, it has no stream yet: ``opened`` returns at once, and the
    route answers 200 and heartbeats while it waits for a slot (lesson 09)."""
    ours = await proxy(start_server, upstream.url, max_active=1, max_queue=1)
    first = ours.engine.start(model_request(simulate_sent={"itl_ms": 600_000}), "sse")
    await first.opened(60)
    second = ours.engine.start(model_request(), "sse")
    with trio.fail_after(10):  # a hang guard, not a timing assert
        await second.opened(60)
    assert second.id in ours.engine.queued and not second.finished
    second.cancel("client_disconnect")
    first.cancel("client_disconnect")


async def test_opened_ends_with_its_caller(nursery, start_server):
    """The route awaiting ``opened`` is cancelled (its client left before
    our answer): the generation is cancelled, the upstream request closed;
    a shutdown meanwhile raises the 503 every other waiter gets."""
    ours = await proxy(start_server, await garbage_upstream(nursery, b"", close=False))
    backend = ours.engine.backend
    gen = ours.engine.start(model_request(), "sse")
    with trio.CancelScope() as scope:
        scope.cancel()  # already cancelled: the first checkpoint in opened() raises
        await gen.opened(60)
    assert (gen.trace.events[-1].name, gen.trace.events[-1].detail) == ("cancelled", "client_disconnect")
    other = ours.engine.start(model_request(), "sse")

    async def shut_down() -> None:
        await trio.testing.wait_all_tasks_blocked()  # opened() is waiting
        ours.engine.cancel_all("shutdown")

    nursery.start_soon(shut_down)
    with pytest.raises(APIError) as stopped:
        await other.opened(60)
    assert (stopped.value.status, stopped.value.code) == (503, "server_shutdown")
    with trio.fail_after(10):
        while backend.in_flight:  # each pump task saw its close() and ended
            await trio.testing.wait_all_tasks_blocked()


# -- endings the upstream never sees coming: a queue, a shutdown --------------
async def test_cancelled_while_queued_never_reaches_the_upstream(upstream, start_server, client, caplog):
    """``--max-active 1 --max-queue 1``: the second stream waits for a slot;
    its client leaves; it ends ``cancelled(client_disconnect)`` without ever
    being admitted, so no upstream request was made for it."""
    ours = await proxy(start_server, upstream.url, max_active=1, max_queue=1)
    backend, url = ours.engine.backend, f"{ours.url}/v1/chat/completions"
    ask = body(simulate={"itl_ms": 600_000})
    async with client.stream("POST", url, json=ask) as first:
        first_chunks = first.aiter_raw()  # kept: a dropped iterator closes the response
        await read_events(first_chunks, until=is_token)
        (running,) = backend.in_flight
        async with client.stream("POST", url, json=ask) as second:
            queued = ours.engine.get(second.headers["x-request-id"])
            second_chunks = second.aiter_raw()
            await read_events(second_chunks, until=is_role)  # then it waits, queued
            assert queued.id in ours.engine.queued
        with trio.fail_after(10):
            await queued.ended.wait()
        assert queued.trace.names() == ["accepted", "queued", "cancelled"]
        assert queued.trace.events[-1].detail == "client_disconnect"
        assert backend.in_flight == {running} and not ours.engine.queued
    theirs = await upstream_trace(upstream, running.upstream_id)
    assert theirs["events"][-1]["detail"] == "client_disconnect"
    with trio.fail_after(10):
        while backend.in_flight:
            await trio.testing.wait_all_tasks_blocked()
    no_tracebacks(caplog)


async def test_shutdown_closes_the_upstream_requests(upstream, nursery, client, caplog, monkeypatch):
    """Graceful shutdown with a stream still running at the drain's end: our
    client gets ``server_shutdown``, the upstream sees its client leave
    (its trace: ``cancelled(client_disconnect)``), no pump task is left and
    nothing is logged with a traceback; then the server stops."""
    config = Config(upstream=upstream.url + "/v1", upstream_key_env=KEY_ENV, drain_timeout=0.2)
    app = create_app(config)
    trigger, stopped = trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    url = await nursery.start(run_server)
    backend = app.extensions["refimpl.engine"].backend
    ask = body(simulate={"itl_ms": 600_000})
    async with client.stream("POST", f"{url}/v1/chat/completions", json=ask) as resp:
        chunks = resp.aiter_raw()
        await read_events(chunks, until=is_token)
        (stream,) = backend.in_flight
        trigger.set()
        rest = await read_events(chunks)
    assert rest[-1][0] == "error" and json.loads(rest[-1][1])["error"]["code"] == "server_shutdown"
    with trio.fail_after(30):
        await stopped.wait()
    assert not backend.in_flight
    theirs = await upstream_trace(upstream, stream.upstream_id)
    assert (theirs["events"][-1]["name"], theirs["events"][-1]["detail"]) == (
        "cancelled",
        "client_disconnect",
    )
    no_tracebacks(caplog)


async def test_one_upstream_connection_serves_request_after_request(upstream, start_server, client):
    """After ``[DONE]`` the stream reads the body to its end, so httpx puts
    the connection back in its pool: the next request reuses it instead of
    paying for a new TCP (and, to a remote upstream, TLS) handshake."""
    ours = await proxy(start_server, upstream.url)
    backend = ours.engine.backend
    pool = backend.client._transport._pool  # httpx's internals: test-only
    seen = []
    for _ in range(3):
        async with client.stream("POST", f"{ours.url}/v1/chat/completions", json=body()) as resp:
            assert (await read_events(resp.aiter_raw()))[-1][1] == "[DONE]"
        with trio.fail_after(10):
            while backend.in_flight:  # the task reads the body's last bytes
                await trio.testing.wait_all_tasks_blocked()
        seen.append([id(c) for c in pool.connections if c.is_idle()])
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 1
