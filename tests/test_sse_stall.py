"""Stalled readers on SSE (``POST /v1/chat/completions``, HTTP/1.1; DESIGN §3).

A client that stops reading pauses the model (hypercorn's write blocks:
backpressure, lesson 10).  One that reads nothing for ``stall_timeout``
seconds is dropped: the watchdog in ``refimpl/hypercorn_patches.py`` times
each write of the response and closes the connection when one has waited
that long, which also frees the write hypercorn holds shielded from
cancellation (DESIGN §4).  What this file checks:

* a client that never reads is dropped, its generation's trace ends
  ``cancelled(stall_timeout)``, the model stopped after about a socket's
  worth of tokens (everything it made went into the socket, but at most one
  write), and the active gauge is back to 0;
* a reader that is slow but keeps reading, through an answer many stall
  timeouts long, is never dropped;
* ``stall_timeout=None`` switches it off: a client that stops reading keeps
  its generation paused, for an hour of (trio's virtual) time;
* a stalled client does not hold up graceful shutdown: the stall guard
  drops it while hypercorn waits its ``graceful_timeout``, and with a stall
  timeout longer than the whole shutdown, the watchdog drops it when
  hypercorn gives up on the connection (its cancel cannot end a shielded
  write either).

The stalled peers are raw sockets with a 4 KiB receive buffer speaking
HTTP/1.1 through ``h11`` (``posted`` from ``test_fastwrite.py``), closed on
the way out, pass or fail: a server blocked writing to a peer that neither
reads nor closes would otherwise hang the teardown instead of failing it.
Waits are on ``Generation.ended``, on trio's quiescence, or on trio's
virtual clock (``autojump_clock``); the ``fail_after`` guards only turn a
hang into a failure, and no wall-clock duration is asserted (the shutdown
tests compare times on the virtual clock).
"""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import TEST_SIMULATE, chat_body
from test_fastwrite import posted, read_to_eof
from test_lifecycle import metric
from test_websocket import ended, running

from refimpl.app import create_app, hypercorn_config, serve
from refimpl.config import Config
from refimpl.model import count_tokens
from refimpl.sse import SSEParser

BIG = {"ttft_ms": 0, "itl_ms": 0, "tokens": 10**7}  # more than any socket buffer holds


def stream_body(simulate: dict[str, Any]) -> dict[str, Any]:
    return chat_body(stream=True, simulate=simulate)


def sse_events(conn: h11.Connection, raw: bytes) -> list:
    """The complete SSE events in a (possibly cut) HTTP/1.1 response."""
    conn.receive_data(raw)
    body = bytearray()
    while (event := conn.next_event()) is not h11.NEED_DATA:
        if isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    return SSEParser().feed(bytes(body))  # not close(): a cut event is no event


def content_of(events: list) -> str:
    chunks = [json.loads(e.data) for e in events if e.data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


async def test_a_client_that_stops_reading_is_dropped(start_server, client):
    server = await start_server(stall_timeout=0.3)
    async with posted(server.url, stream_body(BIG), rcvbuf=4096) as (stream, conn):
        gen = await running(server)
        event = await ended(gen)  # the client never reads
        assert (event.name, event.detail) == ("cancelled", "stall_timeout")
        made = gen.completion_tokens
        # Now read what the server managed to send before it gave up; the
        # read ends because the server closed the connection.
        events = sse_events(conn, await read_to_eof(stream, 30))
    assert made < BIG["tokens"] // 100  # the model stopped when the socket filled up
    # Everything the model made went into the socket, except at most the
    # one write that was stuck when the connection was dropped: the server
    # never held more than that.
    received = count_tokens(content_of(events))
    batch = server.app.config["REFIMPL"].batch_tokens
    assert made - batch <= received <= made
    assert all(e.type == "message" and e.data != "[DONE]" for e in events)
    assert not server.engine.active
    text = (await client.get(server.url + "/metrics")).text
    assert metric(text, "refimpl_active_generations") == 0
    assert 'refimpl_cancellations_total{reason="stall_timeout"} 1.0' in text


async def test_a_slow_but_steady_reader_is_not_dropped(start_server, autojump_clock):
    """Only a write that waits stall_timeout counts, not a long answer: the
    answer takes twenty stall timeouts, and the client reads a little at a
    time, every so often."""
    server = await start_server(stall_timeout=0.5)
    simulate = {"ttft_ms": 0, "itl_ms": 100, "tokens": 100}  # 10 s
    raw = bytearray()
    async with posted(server.url, stream_body(simulate), rcvbuf=4096) as (stream, conn):
        gen = await running(server)
        with trio.fail_after(60):
            while b"data: [DONE]" not in raw:
                data = await stream.receive_some(1024)
                assert data, "the server dropped a client that was reading"
                raw += data
                await trio.sleep(0.2)  # the client's own pace (virtual time)
        events = sse_events(conn, bytes(raw))
    assert events[-1].data == "[DONE]"
    assert count_tokens(content_of(events)) == simulate["tokens"]
    assert gen.trace.names()[-1] == "done"


async def test_no_stall_timeout_keeps_a_stalled_client_paused(start_server, autojump_clock):
    """``stall_timeout=None``: the model waits for the socket, for ever."""
    server = await start_server(stall_timeout=None)
    async with posted(server.url, stream_body(BIG), rcvbuf=4096):
        gen = await running(server)
        await trio.testing.wait_all_tasks_blocked()  # everyone is stuck
        paused_at = gen.completion_tokens
        await trio.sleep(3600)  # an hour, on trio's virtual clock
        await trio.testing.wait_all_tasks_blocked()
        assert gen.completion_tokens == paused_at < BIG["tokens"]  # paused...
        assert not gen.finished  # ... not ended
    # The client hung up: that ends it, as any disconnect does.
    event = await ended(gen)
    assert (event.name, event.detail) == ("cancelled", "client_disconnect")


#: How long hypercorn waits for open connections once our drain is over.
GRACEFUL = hypercorn_config("127.0.0.1", 0).graceful_timeout


async def stalled_then_shut_down(drain_timeout: float, stall_timeout: float) -> tuple[list[str], float]:
    """Start a server, stall a client on it, trigger shutdown; the server
    must stop (within a ``fail_after``).  Returns the generation's trace and
    the (virtual) seconds from the trigger to the server's stop."""
    config = Config(simulate=TEST_SIMULATE, drain_timeout=drain_timeout, stall_timeout=stall_timeout)
    app = create_app(config)
    engine = app.extensions["refimpl.engine"]
    trigger, stopped = trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_server)
        async with posted(url, stream_body(BIG), rcvbuf=4096):
            with trio.fail_after(10):
                while not engine.active:
                    await trio.testing.wait_all_tasks_blocked()
            (gen,) = engine.active.values()
            await trio.testing.wait_all_tasks_blocked()  # the write is stuck
            trigger.set()
            triggered = trio.current_time()
            with trio.fail_after(60):
                await stopped.wait()  # never a hang
            took = trio.current_time() - triggered
    return [f"{e.name}({e.detail})" if e.detail else e.name for e in gen.trace.events], took


async def test_a_stalled_client_does_not_hold_up_graceful_shutdown(autojump_clock):
    """The drain ends the generation (``shutdown``) but cannot free the
    stuck write; the stall guard does, while hypercorn waits its
    graceful_timeout for the connection."""
    trace, took = await stalled_then_shut_down(drain_timeout=0.5, stall_timeout=1.0)
    assert trace[-1] == "cancelled(shutdown)"
    assert took < 0.5 + GRACEFUL  # the guard, not hypercorn giving up


async def test_nor_when_the_stall_timeout_is_longer_than_the_shutdown(autojump_clock):
    """With the defaults' shape (stall 30 s > drain 10 s + hypercorn's 3 s):
    when hypercorn gives up on the connection and cancels it, a write still
    stuck would pin it for ever, so the watchdog drops it then."""
    trace, took = await stalled_then_shut_down(drain_timeout=1.0, stall_timeout=600.0)
    assert trace[-1] == "cancelled(shutdown)"
    assert took == pytest.approx(1.0 + GRACEFUL)  # when hypercorn gave up, not at 600 s
