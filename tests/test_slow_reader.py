"""Lesson 10's slow reader, and what the lesson says it shows under each policy.

``refimpl/examples/slow_reader.py`` reads a stream at full speed for a
while, then at a fixed number of tokens per second, over a raw socket with
a 4 KiB receive buffer, and samples the model's token count from the server.
Lesson 10 (and its notebook) run four of them at once on one server, one
per backpressure policy and one on lesson 09's zombie route; this file runs
the same workload and checks each thing the lesson says about it:

* ``pause``: the model stays within the socket buffers' worth of tokens of
  the client and stands still in between (``paused``/``write_blocked``);
* ``coalesce``: the model runs further ahead, stands still at the cap
  (``paused``/``buffer_full``, no token made until ``resumed``), and a full
  buffer leaves as one chunk of exactly the cap's tokens;
* ``disconnect``: the client gets ``event: error`` ``slow_consumer`` after
  every token the model made, and the trace ends ``cancelled(slow_consumer)``;
* the zombie (no backpressure): the model makes the whole answer at its own
  pace, however slowly the client reads; the difference waits in its queue;
* a reader that stops reading altogether is dropped by the stall guard,
  whatever the policy (``cancelled(stall_timeout)``).

The side-by-side run is on trio's virtual clock (``autojump_clock``): the
model's pace, the reader's pace and the policy's window are exact, and the
clock moves only when every task waits, so the sockets' buffers really
fill.  The stalled readers run on the real clock (the test says why) and
wait on ``Generation.ended``.  The assertions are on counts and orderings,
never on durations.
"""

from __future__ import annotations

import math
from functools import partial
from itertools import pairwise

import trio
from conftest import chat_body
from test_websocket import ended, running

from refimpl.config import Config
from refimpl.examples import zombie
from refimpl.examples.slow_reader import Reading, read_slowly
from refimpl.model import Simulate

# The notebook's workload: a token every 5 ms (~200 tokens/s), a reader that
# takes everything for 0.5 s, then 20 tokens/s.
MODEL = Simulate(ttft_ms=0, itl_ms=5, tokens=100_000)
CAP, MIN_RATE, WINDOW = 100, 50.0, 1.0
SERVER = Config(simulate=MODEL, coalesce_max_tokens=CAP, min_tokens_per_s=MIN_RATE, slow_window=WINDOW)
PACE = {"fast_for": 0.5, "tokens_per_s": 20.0, "stop_after": 7.0}
#: A reader that takes everything for 0.2 s, then nothing (it never hangs up).
STALLED = {"fast_for": 0.2, "tokens_per_s": 0.0, "stop_after": math.inf}
#: Tokens the model would make in the run with nobody slowing it down.
UNTHROTTLED = int(PACE["stop_after"] / (MODEL.itl_ms / 1000))


def body(policy: str) -> dict:
    return chat_body("Tell me a long story.", backpressure=policy)


async def side_by_side(server, **pace) -> tuple[dict[str, Reading], dict[str, dict]]:
    """The three policies at once on one server, as the notebook runs them."""
    readings: dict[str, Reading] = {}

    async def one(policy: str) -> None:
        readings[policy] = await read_slowly(server.url, body(policy), **{**PACE, **pace})

    async with trio.open_nursery() as nursery:
        for policy in ("pause", "coalesce", "disconnect"):
            nursery.start_soon(one, policy)
    traces = {policy: await server.trace(r.id) for policy, r in readings.items()}
    return readings, traces


def named(trace: dict) -> list[str]:
    return [f"{e['name']}({e['detail']})" if e["detail"] else e["name"] for e in trace["events"]]


async def test_three_policies_on_one_slow_reader(start_server, autojump_clock):
    server = await start_server(SERVER)
    readings, traces = await side_by_side(server)
    pause, coalesce, disconnect = readings["pause"], readings["coalesce"], readings["disconnect"]
    for reading in readings.values():  # each read fast, then slowed down
        assert reading.slowed_at is not None and reading.received_by(reading.slowed_at) > 0

    # pause: the model waits for the client, a socket's worth ahead at most.
    assert pause.ending == "left"  # still going when we hung up
    assert "paused(write_blocked)" in named(traces["pause"])
    assert pause.made[-1][1] < UNTHROTTLED / 2  # it stood still most of the time
    assert 0 < pause.most_ahead() < 2 * CAP

    # coalesce: further ahead, by the cap and then some; still at the cap.
    events = traces["coalesce"]["events"]
    assert "paused(buffer_full)" in named(traces["coalesce"])
    assert coalesce.most_ahead() > pause.most_ahead() + CAP / 2
    assert coalesce.made[-1][1] > pause.made[-1][1]
    for paused, after in pairwise(events):
        if paused["name"] == "paused":  # nothing made until the writer took the buffer
            assert after["name"] in ("resumed", "cancelled") and after["tokens"] == paused["tokens"]
    assert max(coalesce.chunks) == CAP  # a full buffer leaves as one chunk
    assert set(pause.chunks) == {1}  # pause: one token per chunk, always

    # disconnect: an error event, after every token the model made.
    assert disconnect.ending == "error" and disconnect.error["code"] == "slow_consumer"
    assert named(traces["disconnect"])[-1] == "cancelled(slow_consumer)"
    assert disconnect.tokens == traces["disconnect"]["completion_tokens"]
    assert disconnect.text == pause.text[: len(disconnect.text)]  # the same answer, cut short


async def test_without_backpressure_the_model_runs_to_the_end(start_server, autojump_clock):
    """The broken version: lesson 09's zombie route, whose model feeds an
    unbounded queue in a task of its own.  The queue never pushes back, so
    with the same slow reader the model makes the whole answer at its own
    pace; what the client has not read waits in the queue, far more than
    the socket's worth ``pause`` lets the model get ahead."""
    server = await start_server(SERVER)
    zombie.register(server.app)
    answer = {"ttft_ms": 0, "itl_ms": MODEL.itl_ms, "tokens": 1000}  # 5 s of model, then done
    reading, pause = [
        await read_slowly(url, chat_body("Tell me a long story.", simulate=answer), **PACE)
        for url in (server.url + "/broken/zombie", server.url)
    ]
    trace = await server.trace(reading.id)
    assert named(trace)[-1] == "done(stop)" and trace["completion_tokens"] == answer["tokens"]
    assert reading.ending == "left"  # we hung up long before we had it all
    assert reading.most_ahead() > answer["tokens"] / 2  # in the queue, not in the socket
    assert pause.most_ahead() < 2 * CAP and pause.made[-1][1] < answer["tokens"] / 2


async def test_a_reader_that_stops_is_dropped_whatever_the_policy(start_server):
    """``tokens_per_s=0``: after its fast start the reader reads nothing; no
    policy can rate a write that never returns, so the stall guard acts.

    On the real clock, one server per policy, waiting on ``Generation.ended``.
    Not on the virtual clock: the guard (``hypercorn_patches._stall_guard``)
    sleeps until ``oldest + limit`` and then asks ``now - oldest >= limit``;
    the virtual clock lands exactly on that deadline, where the float
    subtraction can come out a hair under the limit ((2.69 + 2.0) - 2.69 <
    2.0), and the guard would spin with the clock standing still."""

    async def stalled(policy: str) -> None:
        server = await start_server(SERVER, stall_timeout=0.3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(read_slowly, server.url, body(policy), **STALLED))
            gen = await running(server)
            event = await ended(gen)  # the guard drops it; we never hang up
            nursery.cancel_scope.cancel()
        assert (event.name, event.detail) == ("cancelled", "stall_timeout"), policy
        assert not server.engine.active, policy

    async with trio.open_nursery() as nursery:
        for policy in ("pause", "coalesce", "disconnect"):
            nursery.start_soon(stalled, policy)
