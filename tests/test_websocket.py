"""``/v1/ws/chat`` with a real ``trio-websocket`` client (DESIGN §2-§3, lesson 03).

Many turns on one socket, cancel, a failing model, bad input, a second chat
while one runs, and the socket closing mid-generation -- each observed on the
wire and in the generation's trace, never by sleeping.  The helpers at the
top are shared with the other ``test_websocket_*.py`` files.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from refimpl.model import simulated_text
from refimpl.protocols.websocket_chat import PATH

HI = [{"role": "user", "content": "Hello"}]
SLOW = {"ttft_ms": 0, "itl_ms": 60_000}  # one token, then a minute of silence


def ws_url(server, path: str = PATH) -> str:
    return server.url.replace("http://", "ws://") + path


@asynccontextmanager
async def open_chat(server, path: str = PATH) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(ws_url(server, path)) as ws:
        yield ws


def chat(messages=HI, **fields: Any) -> str:
    return json.dumps({"type": "chat", "messages": messages, **fields})


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())


async def finish_turn(ws: WebSocketConnection) -> tuple[str, dict[str, Any]]:
    """Read until the turn's final message; return (all content, final)."""
    content = ""
    while (message := await receive(ws))["type"] == "token":
        content += message["content"]
    return content, message


async def turn(ws: WebSocketConnection, **fields: Any) -> tuple[str, dict[str, Any]]:
    await ws.send_message(chat(**fields))
    return await finish_turn(ws)


async def close_code(ws: WebSocketConnection) -> int:
    """The code of the close frame the server sends next (failing on a message)."""
    with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
        message = await ws.get_message()
        pytest.fail(f"expected a close, got {message!r}")
    return closed.value.reason.code


async def running(server):
    """The generation the server is running (waits until there is one)."""
    with trio.fail_after(10):
        while not server.engine.active:
            await trio.testing.wait_all_tasks_blocked()
    (gen,) = server.engine.active.values()
    return gen


async def ended(gen):
    with trio.fail_after(10):
        await gen.ended.wait()
    return gen.trace.events[-1]


# -- turns ------------------------------------------------------------------
async def test_one_turn_tokens_then_done(server):
    async with open_chat(server) as ws:
        content, done = await turn(ws)
    assert content == "".join(simulated_text("Hello", 0)[:24])
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 1, "completion_tokens": 24, "total_tokens": 25}
    trace = await server.trace(done["id"])
    assert [e["name"] for e in trace["events"]] == ["accepted", "first_token", "done"]
    assert trace["protocol"] == "websocket" and trace["completion_tokens"] == 24


async def test_one_token_message_per_token_when_the_model_is_slower(server):
    """With the socket ahead of the model, each token leaves in its own message."""
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate={"itl_ms": 1, "tokens": 5}))
        messages = [await receive(ws) for _ in range(6)]
    assert [m["type"] for m in messages] == ["token"] * 5 + ["done"]
    assert [m["content"] for m in messages[:5]] == simulated_text("Hello", 0)[:5]


async def test_many_turns_on_one_socket(server):
    async with open_chat(server) as ws:
        finals = [(await turn(ws, max_tokens=n))[1] for n in (3, 5, 7)]
    assert [f["usage"]["completion_tokens"] for f in finals] == [3, 5, 7]
    assert {f["finish_reason"] for f in finals} == {"length"}
    assert len({f["id"] for f in finals}) == 3
    assert not server.engine.active


# -- cancel -----------------------------------------------------------------
async def test_cancel_mid_generation_stops_the_model_at_once(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        assert (await receive(ws))["type"] == "token"
        gen = await running(server)
        await ws.send_message('{"type":"cancel"}')
        cancelled = await receive(ws)  # long before the model's next token
        assert cancelled == {
            "type": "cancelled",
            "id": gen.id,
            "reason": "client_cancel",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        event = gen.trace.events[-1]
        assert (event.name, event.detail, event.tokens) == ("cancelled", "client_cancel", 1)
        # ...and the socket is ready for the next turn at once.
        _content, done = await turn(ws)
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 24
    assert not server.engine.active


async def test_cancel_before_the_first_token(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate={"ttft_ms": 60_000}))
        gen = await running(server)
        await ws.send_message('{"type":"cancel"}')
        content, cancelled = await finish_turn(ws)
    assert content == "" and cancelled["type"] == "cancelled"
    assert cancelled["usage"]["completion_tokens"] == 0
    assert gen.trace.names() == ["accepted", "cancelled"]


async def test_cancel_with_nothing_running_is_ignored(server):
    """A cancel that crosses ``done`` on the wire is a race, not an error."""
    async with open_chat(server) as ws:
        await ws.send_message('{"type":"cancel"}')
        _content, done = await turn(ws)
    assert done["type"] == "done"


async def test_closing_the_socket_cancels_the_generation(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        gen = await running(server)
    # leaving the block closed the socket while the model waits a minute
    event = await ended(gen)
    assert (event.name, event.detail, event.tokens) == ("cancelled", "client_disconnect", 1)
    assert not server.engine.active


# -- errors -----------------------------------------------------------------
async def test_model_error_is_a_message_and_the_socket_stays_usable(server):
    async with open_chat(server) as ws:
        content, error = await turn(ws, simulate={"fail_after_tokens": 3, "fail_with": "overloaded"})
        assert content == "".join(simulated_text("Hello", 0)[:3])
        assert error["type"] == "error" and error["error"]["code"] == "overloaded"
        assert error["error"]["type"] == "server_error" and error["error"]["message"]
        trace = await server.trace(error["id"])
        assert trace["events"][-1] | {"at": 0} == {
            "name": "error",
            "at": 0,
            "tokens": 3,
            "detail": "overloaded",
        }
        _, done = await turn(ws)
    assert done["type"] == "done"


BAD_MESSAGES = {
    "not JSON": ("hello", "invalid_json", None),
    "NaN is not JSON": ('{"type":"chat","simulate":{"tokens":NaN}}', "invalid_json", None),
    "number overflows": ('{"type":"chat","simulate":{"tokens":1e400}}', "invalid_json", None),
    "nested too deep": ("[" * 100_000, "invalid_json", None),
    "not an object": ("[1, 2]", "invalid_json", None),
    "no type": ('{"messages": []}', "missing_required_parameter", "type"),
    "unknown type": ('{"type": "stop"}', "unknown_message_type", "type"),
    "type not a string": ('{"type": ["chat"]}', "unknown_message_type", "type"),
    "unknown field": (chat(model="gpt-4"), "unknown_parameter", "model"),
    "lone surrogate quoted back": ('{"type":"chat","\\ud800":1}', "unknown_parameter", "\ud800"),
    "field on cancel": ('{"type":"cancel","id":"x"}', "unknown_parameter", "id"),
    "no messages": ('{"type":"chat"}', "invalid_value", "messages"),
    "empty messages": (chat(messages=[]), "invalid_value", "messages"),
    "bad role": (chat(messages=[{"role": "robot", "content": "hi"}]), "invalid_value", "messages[0]"),
    "bad content": (chat(messages=[{"role": "user", "content": 5}]), "invalid_value", "messages[0].content"),
    "max_tokens 0": (chat(max_tokens=0), "invalid_value", "max_tokens"),
    "max_tokens bool": (chat(max_tokens=True), "invalid_value", "max_tokens"),
    "simulate not object": (chat(simulate=3), "invalid_value", "simulate"),
    "unknown knob": (chat(simulate={"speed": 3}), "unknown_parameter", "simulate.speed"),
    "negative knob": (chat(simulate={"itl_ms": -1}), "invalid_value", "simulate.itl_ms"),
}


@pytest.mark.parametrize("text, code, param", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
async def test_bad_message_gets_an_error_and_the_socket_stays_usable(server, text, code, param):
    async with open_chat(server) as ws:
        await ws.send_message(text)
        error = await receive(ws)
        assert error["type"] == "error" and "id" not in error
        assert error["error"]["type"] == "invalid_request_error"
        assert (error["error"]["code"], error["error"]["param"]) == (code, param)
        assert error["error"]["message"]
        _, done = await turn(ws)
    assert done["type"] == "done"
    assert not server.engine.active


async def test_second_chat_while_one_runs_is_an_error(server):
    """We do not queue it (lesson 03): the running turn carries on untouched."""
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        assert (await receive(ws))["type"] == "token"
        await ws.send_message(chat())
        error = await receive(ws)
        assert error["error"]["code"] == "generation_in_progress"
        gen = await running(server)
        assert not gen.trace.finished
        await ws.send_message('{"type":"cancel"}')
        _, cancelled = await finish_turn(ws)
        assert cancelled["id"] == gen.id
        _, done = await turn(ws)
    assert done["type"] == "done"


async def test_too_many_generations_is_an_error_not_a_close(start_server):
    server = await start_server(max_active=1, max_queue=0)
    async with open_chat(server) as first, open_chat(server) as second:
        await first.send_message(chat(simulate=SLOW))
        await receive(first)
        _, error = await turn(second)
        assert error["error"]["code"] == "too_many_requests"
        assert error["error"]["type"] == "rate_limit_error"
        await first.send_message('{"type":"cancel"}')
        await finish_turn(first)
        _, done = await turn(second)
    assert done["type"] == "done"


# -- protocol violations: close codes ------------------------------------------
@pytest.mark.parametrize("frame", [b"\x00binary", b""], ids=["binary", "empty binary"])
async def test_binary_frame_closes_1003(server, frame):
    async with open_chat(server) as ws:
        await ws.send_message(frame)
        assert await close_code(ws) == 1003


async def test_binary_frame_mid_generation_closes_and_cancels(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        gen = await running(server)
        await ws.send_message(b"\x01")
        assert await close_code(ws) == 1003
    event = await ended(gen)
    assert (event.name, event.detail) == ("cancelled", "protocol_error")


async def test_oversized_message_closes_1009(start_server):
    server = await start_server(ws_max_message_bytes=1024)
    async with open_chat(server) as ws:
        await ws.send_message("x" * 1024)  # at the limit: only a bad message
        assert (await receive(ws))["error"]["code"] == "invalid_json"
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        gen = await running(server)
        await ws.send_message(chat(messages=[{"role": "user", "content": "x" * 1024}]))
        assert await close_code(ws) == 1009
    event = await ended(gen)
    assert (event.name, event.detail) == ("cancelled", "message_too_big")


async def test_shutdown_cancels_with_its_reason(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        server.engine.cancel_all("shutdown")
        _, cancelled = await finish_turn(ws)
    assert (cancelled["type"], cancelled["reason"]) == ("cancelled", "shutdown")


async def test_a_bug_of_ours_closes_1011_not_1000(server, monkeypatch, caplog):
    """The last resort: a crash while handling a message is logged, the
    generation is ended, and the client is told 1011 (internal error)."""
    from refimpl.protocols import websocket_chat

    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)
        gen = await running(server)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(websocket_chat, "parse_client_message", broken)
        await ws.send_message('{"type":"cancel"}')
        assert await close_code(ws) == 1011
    event = await ended(gen)
    assert (event.name, event.detail) == ("cancelled", "internal_error")
    assert "a bug" in caplog.text


async def test_unhashable_role_is_a_bad_message(server):
    async with open_chat(server) as ws:
        await ws.send_message(chat(messages=[{"role": [], "content": "hi"}]))
        error = await receive(ws)
    assert error["error"]["param"] == "messages[0]"


# -- what an open socket costs ---------------------------------------------------
def server_tasks() -> list[str]:
    """Names of the running trio tasks that belong to the server side."""

    def walk(task):
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    names = (t.name for t in walk(trio.lowlevel.current_root_task()))
    return sorted(
        n for n in names if n.startswith(("hypercorn", "quart", "refimpl", "trio._highlevel_serve"))
    )


async def test_an_idle_socket_holds_seven_tasks_until_it_closes(server):
    """Lesson 03, "what a socket costs": measured, not guessed."""
    await trio.testing.wait_all_tasks_blocked()
    before = server_tasks()
    async with open_chat(server) as ws:
        await turn(ws)
        await trio.testing.wait_all_tasks_blocked()
        during = server_tasks()
    for name in before:
        during.remove(name)
    assert [name.rsplit(".", 1)[-1] for name in during] == [
        "_handle",  # hypercorn: the ASGI app
        "handle_messages",  # Quart: ASGI receive -> websocket.receive()
        "handle_websocket",  # Quart: our route (the reader)
        "_keepalive",  # the watchdog: pings
        "_stall_guard",  # the watchdog: stalled writes
        "_watch_over",  # the watchdog: the nursery of the two above
        "_run_handler",  # trio: the TCP connection (hypercorn's TCPServer.run)
    ]
    with trio.fail_after(10):
        while server_tasks() != before:  # all of them go when it closes
            await trio.testing.wait_all_tasks_blocked()
