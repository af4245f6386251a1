"""A generation's life as the trace and the metrics see it (DESIGN §2-§3).

These tests observe the server the way lessons do: through
``GET /v1/debug/generations/{id}``, ``Generation.ended`` and ``GET /metrics``,
never through logs or sleeps.
"""

from __future__ import annotations

import itertools

import httpx
import trio
import trio.testing
from conftest import chat_body
from test_websocket import chat, open_chat

from refimpl.sse import SSEParser

URL = "/v1/chat/completions"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_trace_of_a_finished_stream(server, client):
    async with client.stream("POST", server.url + URL, json=chat_body(stream=True)) as resp:
        await resp.aread()
        gen_id = resp.headers["x-request-id"]
    trace = await server.trace(gen_id)
    assert [e["name"] for e in trace["events"]] == ["accepted", "first_token", "done"]
    accepted, first, done = trace["events"]
    assert accepted["at"] <= first["at"] <= done["at"]
    assert done["detail"] == "stop" and done["tokens"] == 24
    assert trace["completion_tokens"] == 24 and trace["finished"] and trace["protocol"] == "sse"


async def test_disconnect_mid_stream_cancels_at_once(server, client):
    body = chat_body(stream=True, simulate={"itl_ms": 60_000, "ttft_ms": 0})
    async with client.stream("POST", server.url + URL, json=body) as resp:
        gen = server.engine.get(resp.headers["x-request-id"])
        parser, contents = SSEParser(), []
        async for raw in resp.aiter_raw():
            contents += [e for e in parser.feed(raw) if '"content":"' in e.data and '"role"' not in e.data]
            if contents:
                break
    # leaving the block closed the connection while the model waits a minute
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.names()[-1] == "cancelled"
    assert gen.trace.events[-1].detail == "client_disconnect"
    assert gen.completion_tokens == 1
    assert not server.engine.active


async def test_disconnect_before_first_token(server, client):
    body = chat_body(stream=True, simulate={"ttft_ms": 60_000})
    async with client.stream("POST", server.url + URL, json=body) as resp:
        gen = server.engine.get(resp.headers["x-request-id"])
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.names() == ["accepted", "cancelled"]
    metrics = (await client.get(server.url + "/metrics")).text
    assert metric(metrics, "refimpl_active_generations") == 0
    assert metric(metrics, 'refimpl_cancellations_total{reason="client_disconnect"}') == 1


async def test_non_streaming_disconnect_cancels(server):
    body = chat_body(simulate={"ttft_ms": 60_000})
    async with trio.open_nursery() as nursery:

        async def request():
            async with httpx.AsyncClient() as c:
                await c.post(server.url + URL, json=body)

        nursery.start_soon(request)
        while not server.engine.active:  # wait until the server has it
            await trio.testing.wait_all_tasks_blocked()
        (gen,) = server.engine.active.values()
        nursery.cancel_scope.cancel()  # the client gives up
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.events[-1].detail == "client_disconnect"


async def test_metrics_count_tokens_errors_and_active(server, client):
    await client.post(server.url + URL, json=chat_body())
    await client.post(
        server.url + URL,
        json=chat_body(stream=True, simulate={"fail_after_tokens": 2, "fail_with": "overloaded"}),
    )
    text = (await client.get(server.url + "/metrics")).text
    assert metric(text, "refimpl_tokens_total") == 24 + 2
    assert metric(text, "refimpl_generations_total") == 2
    assert metric(text, 'refimpl_errors_total{reason="overloaded"}') == 1
    assert metric(text, "refimpl_active_generations") == 0


async def test_heartbeat_while_waiting_for_first_token(start_server, client, autojump_clock):
    """With a virtual clock: a 10 s TTFT and a 1 s heartbeat give pings
    before the first token and none after it (tokens then flow back to back)."""
    server = await start_server(heartbeat=1.0)
    body = chat_body(stream=True, simulate={"ttft_ms": 10_000, "itl_ms": 0, "tokens": 5})
    events = []
    parser = SSEParser()
    raw_text = b""
    async with client.stream("POST", server.url + URL, json=body) as resp:
        async for raw in resp.aiter_raw():
            raw_text += raw
            events += parser.feed(raw)
    first_content = raw_text.index(b'"content":"', raw_text.index(b'"role"') + 40)
    assert b": ping\n" in raw_text[:first_content]
    assert b": ping\n" not in raw_text[first_content:]
    assert events[-1].data == "[DONE]"  # comments never surface as events
    gen = server.engine.get(resp.headers["x-request-id"])
    pings = [e for e in gen.trace.events if e.name == "heartbeat"]
    assert pings and all(p.tokens == 0 for p in pings)
    assert all(b.at - a.at >= 1.0 for a, b in itertools.pairwise(pings))


async def test_a_writer_that_never_waits_still_notices_the_client_left(server):
    """``Generation.pull`` passes one checkpoint per write when tokens are
    ready.  On a WebSocket nothing else would: the model is never behind
    (itl 0), and once the client has closed the socket hypercorn returns from
    each send at once, without a checkpoint.  Without pull's checkpoint the
    writer would run all ten million tokens for nobody and the trace would
    say ``done``; with it, the generation is cancelled within a few writes."""
    total = 10_000_000
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate={"ttft_ms": 0, "itl_ms": 0, "tokens": total}))
        await ws.get_message()  # the stream is flowing: now hang up
        (gen,) = server.engine.active.values()
    with trio.fail_after(10):
        await gen.ended.wait()
    assert (gen.trace.events[-1].name, gen.trace.events[-1].detail) == ("cancelled", "client_disconnect")
    assert gen.completion_tokens < total // 100
