"""The usual tutorial loop (``refimpl/examples/seed_ws.py``) breaks the way
lesson 03 says, and ``/v1/ws/chat`` does not (STYLE §4, broken/fixed pairs).

Both routes run on one server, so every test drives the broken loop and ours
the same way and compares what the client and the trace saw.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from conftest import TEST_SIMULATE, Server
from test_websocket import SLOW, chat, close_code, ended, finish_turn, open_chat, receive, running
from test_websocket_watchdog import RawPeer

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.examples import seed_ws


@pytest.fixture
async def both(nursery) -> Server:
    """A server with the seed's route at /seed/ws/chat beside ours."""
    app = create_app(Config(simulate=TEST_SIMULATE))
    seed_ws.register(app)
    return Server(await nursery.start(partial(serve, app)), app)


async def test_seed_reads_a_cancel_only_after_the_answer(both):
    async with open_chat(both, seed_ws.PATH) as ws:
        await ws.send_message(chat(simulate={"itl_ms": 20, "tokens": 10}))
        assert (await receive(ws))["type"] == "token"
        gen = await running(both)
        await ws.send_message('{"type":"cancel"}')  # sent after the first token...
        _content, done = await finish_turn(ws)
        # ...but the model wrote the whole answer: nobody read the cancel.
        assert done["type"] == "done" and gen.trace.names()[-1] == "done"
        assert gen.completion_tokens == 10
        # Then the cancel is read as a request, crashes the handler, and the
        # socket closes "normally" (Quart's 1000) without a word of why.
        assert await close_code(ws) == 1000
    async with open_chat(both) as ws:  # ours: cancelled after one token
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        ours = await running(both)
        await ws.send_message('{"type":"cancel"}')
        _, cancelled = await finish_turn(ws)
    assert cancelled["type"] == "cancelled" and ours.completion_tokens == 1


async def test_seed_never_ends_the_generation_of_a_client_that_left(both):
    async with open_chat(both, seed_ws.PATH) as seed, open_chat(both) as ours:
        await seed.send_message(chat(simulate=SLOW))
        await receive(seed)
        seed_gen = await running(both)
        await ours.send_message(chat(simulate=SLOW))
        await receive(ours)
        (our_gen,) = [g for g in both.engine.active.values() if g is not seed_gen]
    # Both sockets are closed now.  Ours ends its generation at once:
    event = await ended(our_gen)
    assert (event.name, event.detail) == ("cancelled", "client_disconnect")
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # both handlers are gone
    # The seed's is still "running": its trace never ends, the gauge stays up.
    assert seed_gen.trace.names() == ["accepted", "first_token"]
    assert list(both.engine.active) == [seed_gen.id]


async def test_seed_loses_the_socket_on_a_model_error(both):
    async with open_chat(both, seed_ws.PATH) as ws:
        await ws.send_message(chat(simulate={"fail_after_tokens": 2, "itl_ms": 1}))
        tokens = [await receive(ws) for _ in range(2)]
        assert [t["type"] for t in tokens] == ["token", "token"]
        assert await close_code(ws) == 1000  # no error message, conversation gone
    async with open_chat(both) as ws:  # ours: an error message, then the next turn
        await ws.send_message(chat(simulate={"fail_after_tokens": 2}))
        _, error = await finish_turn(ws)
        await ws.send_message(chat())
        _, done = await finish_turn(ws)
    assert error["type"] == "error" and done["type"] == "done"


@pytest.mark.parametrize("message", ["not json", b"\x00binary"], ids=["not JSON", "binary"])
async def test_seed_closes_on_bad_input_without_saying_why(both, message):
    async with open_chat(both, seed_ws.PATH) as ws:
        await ws.send_message(message)
        assert await close_code(ws) == 1000


async def test_seed_usage_is_one_mislabelled_number(both):
    async with open_chat(both, seed_ws.PATH) as ws:
        await ws.send_message(chat())
        _, done = await finish_turn(ws)
    assert done == {"type": "done", "usage": {"total_tokens": 24}}  # completion, not total
    async with open_chat(both) as ws:
        await ws.send_message(chat())
        _, done = await finish_turn(ws)
    assert done["usage"] == {"prompt_tokens": 1, "completion_tokens": 24, "total_tokens": 25}


async def test_a_send_timeout_in_the_route_never_fires(nursery):
    """Why the stall timeout lives in ``hypercorn_patches.py``, below ASGI."""
    app = create_app(Config(simulate=TEST_SIMULATE))
    caught = seed_ws.register_send_timeout(app, seconds=0.05)
    server = Server(await nursery.start(partial(serve, app)), app)
    async with await RawPeer.connect(server, rcvbuf=4096, path=seed_ws.SEND_TIMEOUT_PATH) as peer:
        # The peer reads nothing.  Wait until the route has been stuck in one
        # send for ten times its timeout, with nothing at all happening meanwhile:
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked(cushion=0.5)
        assert caught == []  # the deadline passed long ago, and nothing fired
        # Now the client reads again: the stuck send completes, the route's
        # ``with`` block ends without another checkpoint, and the cancel that
        # was due is never delivered.  The route just carries on sending.
        received = 0
        with trio.fail_after(10):
            while received < 4 * 2**20:
                received += len(await peer.stream.receive_some(2**16))
        assert caught == []
