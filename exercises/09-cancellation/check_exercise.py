"""The check of exercise 09: a client that stays, and a client that leaves.

The model writes 200 tokens, one every 10 ms; the client reads 3 and hangs
up (``refimpl.bench_cancel.leave_after``, the same departure lesson 09's
notebook and ``tests/test_zombie.py`` use).  On trio's virtual clock, so
the zombie's two seconds of generating for nobody cost no real time.
"""

from __future__ import annotations

import pytest
import trio
from conftest import chat_body

from refimpl.bench_cancel import leave_after
from refimpl.client import stream_chat
from refimpl.model import simulated_text

TOKENS, ITL = 200, 0.010
LONG = {"ttft_ms": 0, "itl_ms": ITL * 1000, "tokens": TOKENS}
READ = 3


async def test_a_client_that_stays_gets_the_whole_answer(exercise, start_server, client, autojump_clock):
    server = await start_server(None, exercise.register)
    base = server.url + exercise.PATH.removesuffix("/v1/chat/completions")
    with trio.fail_after(10):
        events = [
            e async for e in stream_chat(client, base, chat_body(simulate={"itl_ms": 10, "tokens": 12}))
        ]
    assert [e.content for e in events if e.content] == simulated_text("Hello", 0)[:12]
    assert events[-1].finish_reason == "stop"


async def test_leaving_stops_the_model(exercise, start_server, client, autojump_clock, observe):
    server = await start_server(None, exercise.register)
    left = await leave_after(client, server.url + exercise.PATH, chat_body(simulate=LONG), READ)
    gen = server.engine.get(left.id)
    with trio.move_on_after(5 * ITL):  # five tokens' time to notice
        await gen.ended.wait()
    stopped, made, last = gen.finished, gen.completion_tokens, gen.trace.events[-1]
    with trio.move_on_after(10 * TOKENS * ITL):  # a zombie runs to the end; let it, then judge
        await gen.ended.wait()
    end = gen.trace.events[-1]
    observe(
        f"client read {left.received} of {TOKENS} tokens and left",
        f"the trace's last event: {end.name}({end.detail or ''}), {gen.completion_tokens} tokens made, "
        f"{gen.completion_tokens - left.received} of them after",
    )
    if not stopped and made > left.received:
        pytest.fail(
            f"{5 * ITL * 1000:.0f} ms after the client left the model was still generating "
            f"({made - left.received} tokens made since): a zombie",
            pytrace=False,
        )
    if not stopped:
        pytest.fail(
            "the model made no token after the client left, but the generation never ended: "
            f"its trace stops at {last.name!r} and it holds its slot. Who tells the engine the client left?",
            pytrace=False,
        )
    assert (last.name, last.detail) == ("cancelled", "client_disconnect")
    assert last.tokens == left.received, "no token made for nobody"
    assert not server.engine.active, "the slot is free again"
