"""The zombie generator (``refimpl/examples/zombie.py``) runs the model for
nobody, and ``/v1/chat/completions`` does not (STYLE §4; lesson 09).

Both routes run on one server, and the same client leaves each after a few
tokens of a 200-token answer (a token every 10 ms).  Everything runs on
trio's virtual clock (``autojump_clock``), so the zombie's two seconds of
generating for nobody take no real time and the trace's stamps are the
model's exact schedule.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
from conftest import TEST_SIMULATE, Server, chat_body
from pytest import approx

from refimpl.app import create_app, serve
from refimpl.bench_cancel import leave_after
from refimpl.client import stream_chat
from refimpl.config import Config
from refimpl.examples import zombie

OURS = "/v1/chat/completions"
TOKENS, ITL = 200, 0.010
LONG = {"ttft_ms": 0, "itl_ms": ITL * 1000, "tokens": TOKENS}
READ = 3  # content tokens the client reads before it leaves


@pytest.fixture
async def both(nursery) -> Server:
    """A server with the zombie route beside ours."""
    app = create_app(Config(simulate=TEST_SIMULATE))
    zombie.register(app)
    return Server(await nursery.start(partial(serve, app)), app)


async def test_the_zombie_generates_the_whole_answer_for_nobody(both, client, autojump_clock):
    left = await leave_after(client, both.url + zombie.PATH, chat_body(simulate=LONG), READ)
    gen = both.engine.get(left.id)
    assert gen.id in both.engine.active  # the client is gone; the model holds its slot
    with trio.fail_after(10 * TOKENS * ITL):  # a hang guard on the virtual clock
        await gen.ended.wait()
    # The trace ends "done", with every token of the answer...
    assert gen.trace.names() == ["accepted", "first_token", "done"]
    done = gen.trace.events[-1]
    assert done.tokens == gen.completion_tokens == TOKENS
    # ...most of them made after the client had left, one every 10 ms:
    after = done.tokens - left.received
    assert left.received >= READ and after >= TOKENS - 2 * READ
    assert done.at - left.at == approx(after * ITL, abs=ITL)
    assert not both.engine.active


async def test_our_endpoint_stops_the_model_when_the_client_leaves(both, client, autojump_clock):
    left = await leave_after(client, both.url + OURS, chat_body(simulate=LONG), READ)
    gen = both.engine.get(left.id)
    with trio.fail_after(10 * TOKENS * ITL):
        await gen.ended.wait()
    cancelled = gen.trace.events[-1]
    assert (cancelled.name, cancelled.detail) == ("cancelled", "client_disconnect")
    # The writer heard the disconnect at its next pull, before the model's
    # next token was due: no token made for nobody, no time spent on one.
    assert cancelled.tokens - left.received == 0
    assert cancelled.at - left.at < ITL
    assert not both.engine.active


async def test_a_client_that_stays_gets_the_same_answer_from_both(both, client):
    """The zombie route works (it is broken only when a client leaves)."""
    answers = []
    for path in (zombie.PATH, OURS):
        url = both.url + path.removesuffix("/v1/chat/completions")  # stream_chat adds it back
        events = [e async for e in stream_chat(client, url, chat_body())]
        answers.append(("".join(e.content for e in events), events[-1].finish_reason))
    assert answers[0] == answers[1]
    assert answers[0][1] == "stop" and len(answers[0][0]) > 0
