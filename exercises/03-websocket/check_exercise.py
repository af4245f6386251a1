"""The check of exercise 03: a cancel over a real WebSocket, then another turn.

The model makes a token every 10 ms on trio's virtual clock, so each token
message carries one token and the cancel reaches the server before the
next token is due.  The trace (``GET /v1/debug/generations/{id}``) says what
the server understood: ``cancelled(client_cancel)`` is a cancel message,
``cancelled(client_disconnect)`` a client that hung up instead.
"""

from __future__ import annotations

import pytest
import trio
from trio_websocket import open_websocket_url

from refimpl.model import simulated_text
from refimpl.ws_client import ws_url

LONG = {"ttft_ms": 0, "itl_ms": 10, "tokens": 100}
TEXT = simulated_text("Hello", 0)  # what the model writes for "Hello"


async def turn(exercise, ws, simulate, cancel_after):
    with trio.fail_after(10):
        contents, final = await exercise.chat_and_cancel(ws, simulate, cancel_after)
    if final.get("type") not in ("done", "cancelled", "error") or not {"id", "usage"} <= final.keys():
        shown = repr(final) if len(repr(final)) < 120 else repr(final)[:117] + "..."
        pytest.fail(
            f"the turn ended with {shown}: not a final message from the server"
            " (done, cancelled or error, with an id and usage)",
            pytrace=False,
        )
    return contents, final


async def test_cancel_after_three_tokens(exercise, start_server, autojump_clock, observe):
    server = await start_server()
    async with open_websocket_url(ws_url(server.url)) as ws:
        contents, final = await turn(exercise, ws, LONG, 3)
        trace = await server.trace(final["id"])
    last = trace["events"][-1]
    observe("cancel after 3 of 100 tokens: final message", final)
    assert (final["type"], final.get("reason")) == ("cancelled", "client_cancel")
    assert contents == TEXT[:3]
    assert final["usage"]["completion_tokens"] == 3, "the model stopped at once"
    assert (last["name"], last["detail"]) == ("cancelled", "client_cancel")


async def test_the_next_turn_gets_its_own_answer(exercise, start_server, autojump_clock, observe):
    server = await start_server()
    async with open_websocket_url(ws_url(server.url)) as ws:
        _, first = await turn(exercise, ws, LONG, 3)
        contents, second = await turn(exercise, ws, {"ttft_ms": 0, "itl_ms": 10, "tokens": 5}, None)
    observe("the turn after the cancel", (second["type"], "".join(contents)))
    assert second["id"] != first["id"], f"turn 2 ended with turn 1's {second['type']!r} message"
    assert (second["type"], contents) == ("done", TEXT[:5])


async def test_a_cancel_that_crosses_done(exercise, start_server, autojump_clock, observe):
    """Push on it 1: cancel after the last token; then one more turn."""
    server = await start_server()
    async with open_websocket_url(ws_url(server.url)) as ws:
        contents, final = await turn(exercise, ws, {"ttft_ms": 0, "itl_ms": 10, "tokens": 8}, 8)
        observe("cancel after token 8 of 8: final message", final["type"])
        assert final["type"] in ("done", "cancelled") and contents == TEXT[:8]
        again, after = await turn(exercise, ws, {"ttft_ms": 0, "itl_ms": 10, "tokens": 2}, None)
        assert (after["type"], again) == ("done", TEXT[:2]), "the ignored cancel must not end the next turn"


async def test_tokens_already_on_their_way(exercise, start_server, autojump_clock, observe):
    """At itl_ms 0 the model is ahead of the socket: several token messages
    (up to 64 tokens each) and maybe the final one are on the wire before
    the cancel arrives.  Every token the server sent belongs to this turn."""
    server = await start_server()
    async with open_websocket_url(ws_url(server.url)) as ws:
        contents, final = await turn(exercise, ws, {"ttft_ms": 0, "itl_ms": 0, "tokens": 100}, 1)
        observe(
            "cancel after the first token message at itl_ms 0",
            f"{final['type']}, {len(contents)} token messages",
        )
        made = final["usage"]["completion_tokens"]
        assert "".join(contents) == "".join(TEXT[:made]), "tokens the server sent were left unread"
        again, after = await turn(exercise, ws, {"ttft_ms": 0, "itl_ms": 10, "tokens": 2}, None)
        assert (after["type"], again) == ("done", TEXT[:2])
