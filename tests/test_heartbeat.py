"""Heartbeats (``refimpl/patterns/heartbeat.py``, lesson 08), SSE and WebSocket.

What a heartbeat promises, each checked here on a real server and a real
client under trio's ``MockClock`` (``autojump_clock``), so the times are the
model's exact schedule and a minute of silence takes no real time:

* SSE: after ``--heartbeat`` seconds with nothing sent -- before the first
  token *or between tokens* -- the stream carries a ``: ping`` comment, at an
  event boundary and followed by a blank line; each one is a ``heartbeat``
  event in the generation's trace holding the tokens sent so far, and is
  counted in ``refimpl_heartbeats_total``.  When tokens come faster than the
  interval there is none.  A conforming parser sees only the content.
* WebSocket: the watchdog's pings are heartbeats of the running generation,
  in its trace and in the metric.
* ``keep_websocket_alive`` itself, on a fake connection: a ping every
  interval while the peer answers, and a return (a dead peer) when nothing
  comes back within the timeout.

``tests/test_lifecycle.py`` has the first case (pings while waiting for the
first token); the timeline in each test below is worked out in its docstring.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from conftest import chat_body
from pytest import approx
from test_lifecycle import metric
from test_websocket import chat, finish_turn, open_chat

from refimpl.model import simulated_text
from refimpl.patterns import heartbeat
from refimpl.patterns.heartbeat import SSE_PING, WS_PING_PAYLOAD
from refimpl.sse import SSEParser

URL = "/v1/chat/completions"
TOKENS = simulated_text("Hello", 0)  # chat_body's prompt, the default seed


async def stream(server, client, **simulate: Any) -> tuple[bytes, list, Any]:
    """One streamed chat: the raw body, the parsed events, the generation."""
    body = chat_body(stream=True, simulate=simulate)
    raw, parser = b"", SSEParser()
    async with client.stream("POST", server.url + URL, json=body) as resp:
        async for chunk in resp.aiter_raw():
            raw += chunk
    gen = server.engine.get(resp.headers["x-request-id"])
    return raw, parser.feed(raw) + parser.close(), gen


def blocks(raw: bytes) -> list[bytes]:
    """The body cut at its blank lines: each SSE event, or a ping, whole."""
    *pieces, tail = raw.split(b"\n\n")
    assert tail == b"", "the body ends with a blank line"
    return pieces


def content(events: list) -> list[str]:
    """The content of each content chunk, in order (no role, no ending)."""
    deltas = [json.loads(e.data)["choices"][0]["delta"] for e in events if e.data != "[DONE]"]
    return [d["content"] for d in deltas if d.get("content") and "role" not in d]


def pings_after_tokens(raw: bytes) -> list[int]:
    """For each ping on the wire, how many content chunks came before it."""
    seen, pings = 0, []
    for block in blocks(raw):
        if block == b": ping":
            pings.append(seen)
        else:  # anything else is one whole event: a ping glued to it would show here
            events = SSEParser().feed(block + b"\n\n")
            assert len(events) == 1, f"not one event nor a whole ping: {block[:40]!r}"
            seen += len(content(events))
    return pings


# -- SSE --------------------------------------------------------------------------
async def test_pings_between_tokens_when_the_model_is_slower_than_the_heartbeat(
    start_server, client, autojump_clock
):
    """Heartbeat 1 s, a token every 2.5 s: tokens at t = 0, 2.5, 5 and 7.5;
    the writer is silent for 1 s twice in each gap (t = 1, 2; 3.5, 4.5;
    6, 7), so two pings after each of the first three tokens and none after
    the last, which the model's end follows at once."""
    server = await start_server(heartbeat=1.0)
    raw, events, gen = await stream(server, client, ttft_ms=0, itl_ms=2500, tokens=4)
    on_the_wire = pings_after_tokens(raw)
    assert on_the_wire == [1, 1, 2, 2, 3, 3]
    beats = [e for e in gen.trace.events if e.name == "heartbeat"]
    assert [b.tokens for b in beats] == on_the_wire  # one trace event per ping, in place
    assert [b.at - gen.trace.events[0].at for b in beats] == approx([1, 2, 3.5, 4.5, 6, 7])
    # The parser sees none of it: role, four tokens, the finish, [DONE].
    assert content(events) == TOKENS[:4]
    assert len(events) == 7 and events[-1].data == "[DONE]"
    metrics = (await client.get(server.url + "/metrics")).text
    assert metric(metrics, "refimpl_heartbeats_total") == 6


async def test_no_ping_when_tokens_come_faster_than_the_heartbeat(start_server, client, autojump_clock):
    """Heartbeat 1 s, a token every 0.9 s: the stream lasts 3.6 s, longer than
    the interval, but is never silent for 1 s."""
    server = await start_server(heartbeat=1.0)
    raw, events, gen = await stream(server, client, ttft_ms=900, itl_ms=900, tokens=4)
    assert b": ping" not in raw and pings_after_tokens(raw) == []
    assert "heartbeat" not in gen.trace.names()
    assert gen.trace.events[-1].at - gen.trace.events[0].at == approx(3.6)
    assert content(events) == TOKENS[:4]
    metrics = (await client.get(server.url + "/metrics")).text
    assert metric(metrics, "refimpl_heartbeats_total") == 0


async def test_the_ping_bytes(start_server, client, autojump_clock):
    """A comment line and a blank line, between two events: a reader that
    splits on blank lines (lesson 01's naive one) never glues a ping onto
    the event after it."""
    server = await start_server(heartbeat=1.0)
    raw, events, _ = await stream(server, client, ttft_ms=1500, itl_ms=1500, tokens=2)
    assert raw.count(b"\n\n: ping\n\n") == 2  # one in each silence, at a boundary
    assert raw.count(b": ping") == 2
    assert b": ping\ndata:" not in raw and b": ping\n\ndata:" in raw
    assert [b for b in blocks(raw) if b.startswith(b":")] == [b": ping"] * 2
    assert content(events) == TOKENS[:2]
    assert SSE_PING == b": ping\n\n"  # what the writer sends is exactly that


# -- WebSocket ----------------------------------------------------------------------
async def test_websocket_pings_are_heartbeats_of_the_running_generation(start_server, client, autojump_clock):
    """A ping every second (trio-websocket answers each on its own), a token
    every 2.25 s from t = 0: pings at t = 1, 2 (after the first token) and
    3, 4 (after the second); the third token at 4.5 ends the turn, and the
    pings after it belong to no generation, so they are not counted."""
    server = await start_server(ws_ping_interval=1.0, ws_ping_timeout=10.0)
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate={"ttft_ms": 0, "itl_ms": 2250, "tokens": 3}))
        text, done = await finish_turn(ws)
        gen = server.engine.get(done["id"])
        # Let three more seconds pass (virtual time: nothing waits on it) so
        # that three more pings go out, with no generation running.
        await trio.sleep(3)
    assert text == "".join(TOKENS[:3]) and done["type"] == "done"
    beats = [e for e in gen.trace.events if e.name == "heartbeat"]
    assert [b.tokens for b in beats] == [1, 1, 2, 2]
    metrics = (await client.get(server.url + "/metrics")).text
    assert metric(metrics, "refimpl_heartbeats_total") == 4


# -- keep_websocket_alive, on a fake connection ---------------------------------------
class FakeConnection:
    """A heartbeat.PingTarget that records each ping and answers as told.

    ``answer_after[i]`` is how long the peer takes to answer ping ``i``;
    pings past the end of the list go unanswered (the peer is gone).
    """

    def __init__(self, nursery: trio.Nursery, answer_after: list[float]) -> None:
        self.nursery = nursery
        self.answer_after = answer_after
        self.pings: list[tuple[float, bytes]] = []
        self.heard = trio.Event()

    def listen(self) -> trio.Event:
        self.heard = trio.Event()
        return self.heard

    def send_ping(self, payload: bytes) -> None:
        self.pings.append((trio.current_time(), payload))
        if len(self.pings) <= len(self.answer_after):
            self.nursery.start_soon(self._answer, self.heard, self.answer_after[len(self.pings) - 1])

    async def _answer(self, heard: trio.Event, delay: float) -> None:
        await trio.sleep(delay)
        heard.set()


async def keepalive(answer_after: list[float], interval: float, timeout: float, give_up_at: float):
    """Run keep_websocket_alive from t = 0; return (ping times, when it returned or None)."""
    start = trio.current_time()
    returned_at = None
    async with trio.open_nursery() as nursery:
        conn = FakeConnection(nursery, answer_after)
        with trio.move_on_at(start + give_up_at):
            await heartbeat.keep_websocket_alive(conn, interval, timeout)
            returned_at = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert all(payload == WS_PING_PAYLOAD for _, payload in conn.pings)
    return [at - start for at, _ in conn.pings], returned_at


async def test_keepalive_pings_every_interval_while_the_peer_answers(autojump_clock):
    pings, returned_at = await keepalive([0.0] * 100, interval=10, timeout=2, give_up_at=55)
    assert pings == [10, 20, 30, 40, 50] and returned_at is None  # still going


async def test_keepalive_returns_when_nothing_is_heard_within_the_timeout(autojump_clock):
    pings, returned_at = await keepalive([], interval=10, timeout=2, give_up_at=100)
    assert pings == [10] and returned_at == 12  # one unanswered ping: a dead peer


async def test_keepalive_an_answer_just_in_time_keeps_the_peer(autojump_clock):
    """Answers 1.9 s after the ping (timeout 2) keep it; the next interval
    starts from the answer.  The third ping goes unanswered."""
    pings, returned_at = await keepalive([1.9, 1.9], interval=10, timeout=2, give_up_at=100)
    assert pings == approx([10, 21.9, 33.8]) and returned_at == approx(35.8)
