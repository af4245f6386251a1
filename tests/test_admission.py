"""Admission: a bounded queue in front of the model (lesson 09; DESIGN §2).

``max_active`` generations run at once; up to ``max_queue`` more wait for a
slot, oldest first, and a waiting stream already has its ``200`` and gets
heartbeats; past both, ``429 too_many_requests`` with ``Retry-After``.  A
queued request whose client leaves is removed without ever starting the
model.  Observed through the trace (``queued``, ``admitted``) and
``/metrics``, on trio's virtual clock.
"""

from __future__ import annotations

import trio
import trio.testing
from conftest import chat_body
from test_lifecycle import metric

from refimpl.sse import SSEParser

URL = "/v1/chat/completions"
FOREVER = {"ttft_ms": 60_000}


async def until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


async def test_queue_then_429_then_admitted_in_order(start_server, client, autojump_clock):
    server = await start_server(max_active=1, max_queue=1, heartbeat=1.0)
    engine, raw = server.engine, {}

    async def stream(name, simulate):
        async with client.stream(
            "POST", server.url + URL, json=chat_body(stream=True, simulate=simulate)
        ) as r:
            raw[name] = r.headers["x-request-id"], b"".join([chunk async for chunk in r.aiter_raw()])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, "first", {"ttft_ms": 2500, "itl_ms": 0, "tokens": 3})
        await until(lambda: len(engine.active) == 1)
        nursery.start_soon(stream, "second", {"ttft_ms": 0, "itl_ms": 0, "tokens": 3})
        await until(lambda: len(engine.queued) == 1)
        third = await client.post(server.url + URL, json=chat_body())
        text = (await client.get(server.url + "/metrics")).text
        assert metric(text, "refimpl_queued_generations") == 1
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_requests"
    assert third.headers["retry-after"] == "1"
    first_id, _ = raw["first"]
    second_id, body = raw["second"]
    first, second = engine.get(first_id).trace, engine.get(second_id).trace
    # The second waited the first's 2.5 s, with a ping each second, and started
    # the moment the first ended.
    assert second.names()[:2] == ["accepted", "queued"]
    assert second.names().count("heartbeat") == 2  # at 1 s and 2 s, before the slot at 2.5 s
    assert second.first("admitted").at == first.first("done").at
    assert second.names()[-1] == "done"
    events = SSEParser().feed(body)
    assert events[-1].data == "[DONE]" and body.count(b": ping\n\n") == 2
    assert metric((await client.get(server.url + "/metrics")).text, "refimpl_queued_generations") == 0


async def test_a_queued_client_that_leaves_never_starts_the_model(start_server, client, autojump_clock):
    server = await start_server(max_active=1, max_queue=4)
    engine = server.engine
    async with trio.open_nursery() as nursery:

        async def running():
            await client.post(server.url + URL, json=chat_body(simulate=FOREVER))

        nursery.start_soon(running)
        await until(lambda: len(engine.active) == 1)
        async with client.stream("POST", server.url + URL, json=chat_body(stream=True)) as waiting:
            queued = engine.get(waiting.headers["x-request-id"])
            assert queued.trace.names() == ["accepted", "queued"]
        # The client hung up while queued: out of the queue, the model never ran.
        with trio.fail_after(10):
            await queued.ended.wait()
        assert queued.trace.names() == ["accepted", "queued", "cancelled"]
        assert queued.trace.events[-1].detail == "client_disconnect"
        assert not engine.queued and queued.completion_tokens == 0
        nursery.cancel_scope.cancel()
