"""Backpressure policies (``patterns/backpressure.py``, DESIGN §3, lesson 10).

A client that reads slower than the model writes meets its request's policy,
the same on SSE and on the WebSocket:

* ``pause``: the model makes nothing while the client reads nothing; the
  trace says ``paused`` (``write_blocked``) then ``resumed``; nothing is
  lost;
* ``coalesce``: the model runs ahead up to the cap and stops there
  (``paused``, ``buffer_full``); what was pending leaves as one chunk of
  exactly the cap's tokens; the text is the same as an unthrottled stream;
* ``disconnect``: a client that keeps the model paused and reads fewer than
  ``min_tokens_per_s`` over ``slow_window`` gets ``slow_consumer`` and the
  trace ends ``cancelled(slow_consumer)``; a slow *model* with a fast
  client is never ended;
* the policy comes from the server's setting unless the request names one,
  and a bad name is a 400 naming the ``backpressure`` param.

The clients are raw sockets with a 4 KiB receive buffer (``posted`` from
``test_fastwrite.py``, ``RawPeer`` from ``test_websocket_watchdog.py``), so
the server's writes block for real.  The client's pauses are on trio's
virtual clock (``autojump_clock``): it jumps only when every task is blocked,
so "the client read nothing for 5 s" means the server sat blocked for 5
virtual seconds.  One trap: with so small a window, a reader that starts
reading again does not always reopen it at once; the kernel's persist timer
(RFC 9293 §3.8.6.1), in *real* time, may have to probe it.  While both sides
wait for that, every task is blocked, and the virtual clock would jump to
the next deadline: a stall timeout or a ``fail_after`` would fire at once,
a false hang.  So those tests run with no stall timeout and no
virtual-time guard around the reads (pytest-timeout still ends a real hang).  The memory side (RSS per policy) is
``test_bench_backpressure.py``.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import trio
from conftest import chat_body
from test_fastwrite import expected_tokens, posted
from test_websocket import chat, running
from test_websocket_watchdog import RawPeer
from wsproto.events import CloseConnection

from refimpl.examples.slow_reader import read_slowly
from refimpl.model import count_tokens
from refimpl.sse import SSEParser

PACED = {"ttft_ms": 0, "itl_ms": 1}  # a token every virtual millisecond


def stream_body(tokens: int, policy: str | None = None, **simulate: Any) -> dict[str, Any]:
    extra = {"backpressure": policy} if policy else {}
    return chat_body(stream=True, simulate={**PACED, "tokens": tokens, **simulate}, **extra)


class SSEReader:
    """Reads an SSE response off a raw socket, as slowly as the test says."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream, self.conn = stream, conn
        self.parser = SSEParser()
        self.events: list = []
        self.ended = False
        self.id: str | None = None  # the generation's, from X-Request-Id

    async def read(self, max_bytes: int = 65536) -> None:
        data = await self.stream.receive_some(max_bytes)
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                self.id = dict(event.headers)[b"x-request-id"].decode()
            elif isinstance(event, h11.Data):
                self.events += self.parser.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
                return

    async def until_content(self) -> None:
        while not self.contents():
            await self.read(1024)

    async def to_the_end(self) -> None:
        while not self.ended:
            await self.read()

    def contents(self) -> list[str]:
        chunks = [json.loads(e.data) for e in self.events if e.type == "message" and e.data != "[DONE]"]
        return [
            c["choices"][0]["delta"]["content"]
            for c in chunks
            if c["choices"] and c["choices"][0]["delta"].get("content")
        ]


def names_and_details(trace) -> list[tuple[str, str | None]]:
    return [(e.name, e.detail) for e in trace.events]


# -- pause --------------------------------------------------------------------
async def test_pause_the_model_waits_while_the_client_reads_nothing(start_server, autojump_clock):
    server = await start_server(stall_timeout=None)
    tokens = 20_000
    async with posted(server.url, stream_body(tokens), rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.until_content()
        gen = await running(server)
        await trio.sleep(5)  # the client reads nothing (virtual seconds)
        made = gen.completion_tokens
        await trio.sleep(5)
        assert gen.completion_tokens == made < tokens  # nothing made while nobody reads
        reads_again = trio.current_time()
        await reader.to_the_end()
    assert "".join(reader.contents()) == "".join(expected_tokens(tokens))
    events = gen.trace.events
    names = [e.name for e in events]
    assert names[-1] == "done" and gen.completion_tokens == tokens
    paused, resumed = events[names.index("paused")], events[names.index("resumed")]
    assert paused.detail == "write_blocked"
    assert paused.at < reads_again <= resumed.at  # the whole silence
    assert paused.tokens <= made <= resumed.tokens
    assert [e.at for e in events] == sorted(e.at for e in events)


async def test_pause_a_client_that_keeps_up_is_never_paused(server):
    async with posted(server.url, stream_body(500), rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.to_the_end()
    names = server.engine.get(reader.id).trace.names()
    assert "paused" not in names and names[-1] == "done"


# -- coalesce -----------------------------------------------------------------
async def test_coalesce_runs_ahead_to_the_cap_and_sends_it_as_one_chunk(start_server, autojump_clock):
    cap, tokens = 300, 5_000
    server = await start_server(coalesce_max_tokens=cap, stall_timeout=None)
    async with posted(server.url, stream_body(tokens, "coalesce"), rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.until_content()
        gen = await running(server)
        await trio.sleep(5)  # the client reads nothing; the model goes on, up to the cap
        made = gen.completion_tokens
        await trio.sleep(5)
        assert gen.completion_tokens == made < tokens  # ... and stops there
        await reader.to_the_end()
    contents = reader.contents()
    assert "".join(contents) == "".join(expected_tokens(tokens))  # same text
    assert max(count_tokens(c) for c in contents) == cap  # the pending tokens: one chunk
    details = names_and_details(gen.trace)
    assert ("paused", "buffer_full") in details and ("resumed", None) in details
    assert details[-1] == ("done", "stop")


async def test_coalesce_with_a_fast_client_sends_what_pause_sends(start_server):
    server = await start_server()
    texts = {}
    for policy in ("pause", "coalesce"):
        async with posted(server.url, stream_body(500, policy)) as (stream, conn):
            reader = SSEReader(stream, conn)
            await reader.to_the_end()
        texts[policy] = "".join(reader.contents())
    assert texts["pause"] == texts["coalesce"] == "".join(expected_tokens(500))


async def test_coalesce_passes_on_a_model_failure_and_heartbeats(start_server, autojump_clock):
    server = await start_server(heartbeat=1.0)
    body = stream_body(100, "coalesce", ttft_ms=3_000, fail_after_tokens=10, fail_with="overloaded")
    async with posted(server.url, body) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.to_the_end()
    assert [e.type for e in reader.events].count("error") == 1
    assert json.loads(reader.events[-1].data)["error"]["code"] == "overloaded"
    assert count_tokens("".join(reader.contents())) == 10
    gen = server.engine.get(reader.id)
    assert gen.trace.names().count("heartbeat") >= 2  # pings while the model was silent
    assert not server.engine.active


async def test_coalesce_client_leaving_stops_the_producer(start_server, autojump_clock):
    server = await start_server(coalesce_max_tokens=100)
    async with posted(server.url, stream_body(10_000, "coalesce"), rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.until_content()
        gen = await running(server)
        await trio.sleep(1)
    with trio.fail_after(10):
        await gen.ended.wait()
    assert (gen.trace.events[-1].name, gen.trace.events[-1].detail) == ("cancelled", "client_disconnect")
    made = gen.completion_tokens
    await trio.sleep(5)
    assert gen.completion_tokens == made  # the producer stopped with it


# -- disconnect ---------------------------------------------------------------
async def test_disconnect_ends_a_client_too_slow_for_too_long(start_server, autojump_clock):
    server = await start_server(min_tokens_per_s=50, slow_window=2, stall_timeout=None)
    async with posted(server.url, stream_body(100_000, "disconnect"), rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        gen = await running(server)
        while not reader.ended:
            await reader.read(256)  # about one token event ...
            await trio.sleep(0.1)  # ... every 0.1 s: ~10 tokens/s, under 50
    error = json.loads(reader.events[-1].data)["error"]
    assert reader.events[-1].type == "error" and error["code"] == "slow_consumer"
    assert error["type"] == "invalid_request_error" and "50 tokens/s" in error["message"]
    assert "[DONE]" not in [e.data for e in reader.events]
    details = names_and_details(gen.trace)
    assert details[-1] == ("cancelled", "slow_consumer")
    assert ("paused", "write_blocked") in details
    assert gen.completion_tokens < 100_000


async def test_disconnect_judges_a_steady_slow_reader_over_the_whole_window(start_server, autojump_clock):
    """30 tokens/s against a minimum of 100 over 2 s, from a model at 200
    tokens/s: its writes block, then the kernel wakes the writer with half
    a buffer free and a few writes pass at once, so the trace has pauses of
    about 1.1-1.4 s with short gaps between.  Judged pause by pause it
    would never be ended (no pause lasts the window); over the window, the
    writer was blocked most of the time, and it is."""
    server = await start_server(min_tokens_per_s=100, slow_window=2, stall_timeout=None)
    body = chat_body(backpressure="disconnect", simulate={"ttft_ms": 0, "itl_ms": 5, "tokens": 100_000})
    reading = await read_slowly(server.url, body, fast_for=0.5, tokens_per_s=30, stop_after=30)
    gen = server.engine.get(reading.id)
    assert reading.error is not None and reading.error["code"] == "slow_consumer"
    names = gen.trace.names()
    assert names[-1] == "cancelled" and gen.trace.events[-1].detail == "slow_consumer"


async def test_disconnect_spares_a_fast_client_of_a_slow_model(start_server, autojump_clock):
    server = await start_server(min_tokens_per_s=50, slow_window=2)
    body = stream_body(100, "disconnect", itl_ms=100)  # 10 tokens/s, under the minimum
    async with posted(server.url, body, rcvbuf=4096) as (stream, conn):
        reader = SSEReader(stream, conn)
        await reader.to_the_end()
    assert reader.events[-1].data == "[DONE]"
    gen = server.engine.get(reader.id)
    assert "paused" not in gen.trace.names() and gen.trace.names()[-1] == "done"


# -- choosing the policy ------------------------------------------------------
async def test_server_default_policy_applies_unless_the_request_names_one(start_server, autojump_clock):
    server = await start_server(backpressure="coalesce", coalesce_max_tokens=50, stall_timeout=None)
    for policy, runs_ahead in ((None, True), ("pause", False)):
        async with posted(server.url, stream_body(2_000, policy), rcvbuf=4096) as (stream, conn):
            reader = SSEReader(stream, conn)
            await reader.until_content()
            gen = await running(server)
            await trio.sleep(5)
            details = names_and_details(gen.trace)
            assert (("paused", "buffer_full") in details) is runs_ahead
            await reader.to_the_end()


async def test_unknown_policy_is_a_400_naming_the_param(server, client):
    resp = await client.post(server.url + "/v1/chat/completions", json=stream_body(5, "drop"))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "backpressure" and "pause" in error["message"]
    assert not server.engine.active


# -- the same on the WebSocket ------------------------------------------------
def turn_over(messages: list[dict], _others: list) -> bool:
    return bool(messages) and messages[-1]["type"] != "token"


async def test_websocket_pause_and_coalesce_like_sse(start_server, autojump_clock):
    server = await start_server(coalesce_max_tokens=300, ws_ping_interval=None, stall_timeout=None)
    for policy in ("pause", "coalesce"):
        async with await RawPeer.connect(server, rcvbuf=4096) as peer:
            await peer.send(chat(simulate={**PACED, "tokens": 5_000}, backpressure=policy))
            first, _ = await peer.read_until(lambda m, o: bool(m), max_bytes=1024)
            gen = await running(server)
            await trio.sleep(5)
            made = gen.completion_tokens
            await trio.sleep(5)
            assert gen.completion_tokens == made < 5_000
            rest, _ = await peer.read_until(turn_over)
        messages = first + rest
        assert messages[-1]["type"] == "done"
        contents = [m["content"] for m in messages if m["type"] == "token"]
        assert "".join(contents) == "".join(expected_tokens(5_000))
        details = names_and_details(gen.trace)
        if policy == "pause":
            assert ("paused", "write_blocked") in details
        else:
            assert ("paused", "buffer_full") in details
            assert max(count_tokens(c) for c in contents) == 300


async def test_websocket_slow_consumer_gets_an_error_then_close_1008(start_server, autojump_clock):
    server = await start_server(min_tokens_per_s=50, slow_window=2, stall_timeout=None, ws_ping_interval=None)
    async with await RawPeer.connect(server, rcvbuf=4096) as peer:
        await peer.send(chat(simulate={**PACED, "tokens": 100_000}, backpressure="disconnect"))
        gen = await running(server)
        messages, others = await peer.read_until(
            lambda m, o: any(isinstance(e, CloseConnection) for e in o), pace=0.1, max_bytes=256
        )
    assert messages[-1]["type"] == "error" and messages[-1]["error"]["code"] == "slow_consumer"
    (close,) = [e for e in others if isinstance(e, CloseConnection)]
    assert close.code == 1008
    assert names_and_details(gen.trace)[-1] == ("cancelled", "slow_consumer")
    assert not server.engine.active


async def test_websocket_unknown_policy_is_an_error_message(start_server):
    server = await start_server(ws_ping_interval=None)
    async with await RawPeer.connect(server) as peer:
        await peer.send(chat(backpressure="drop"))
        messages, _ = await peer.read_until(lambda m, o: bool(m))
    assert messages[0]["type"] == "error" and messages[0]["error"]["param"] == "backpressure"
