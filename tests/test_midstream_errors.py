"""Mid-stream failures end the same documented way on SSE and WebSocket (lesson 07).

``patterns/errors.py`` promises, for every kind of failure -- each simulated
``fail_with`` code, a real exception inside the backend (a bug), and a model
that runs past ``--generation-timeout``:

* SSE: the tokens made before the failure, then one ``event: error`` whose
  data is the OpenAI error object, then the body ends with no ``[DONE]``;
* WebSocket: the same tokens, then an ``error`` message carrying the *same*
  error object, and the socket stays usable for the next turn;
* the trace ends ``error(code)``; the log gets one line naming the
  generation for an expected failure, and a traceback only for a bug;
* a Python exception never reaches the client as a truncated body, nor its
  text (it may hold internals).

Timing is on trio's virtual clock (``autojump_clock``).
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing
from conftest import chat_body
from test_sse_endpoint import read_events
from test_websocket import finish_turn, open_chat, turn

from refimpl.model import simulated_text
from refimpl.patterns.errors import FAILURES
from refimpl.protocols.chat_request import FAIL_WITH

URL = "/v1/chat/completions"
EXPECTED_CODES = sorted(FAIL_WITH - {"crash"})
# What a crash may not leak: the exception's own text.
CRASH_TEXT = "simulated crash"


def expected_type(code: str) -> str:
    status, _ = FAILURES[code]
    return "invalid_request_error" if status < 500 else "server_error"


async def sse_failure(server, client, simulate: dict) -> tuple[str, dict, list, dict]:
    """Stream until the failure: (content, error object, events, trace)."""
    resp, events = await read_events(client, server.url, chat_body(stream=True, simulate=simulate))
    assert resp.status_code == 200
    chunks = [json.loads(e.data) for e in events if e.type == "message"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert events[-1].type == "error"  # the last thing on the wire
    assert all(e.data != "[DONE]" for e in events)
    trace = await server.trace(resp.headers["x-request-id"])
    return content, json.loads(events[-1].data), events, trace


def tokens_text(n: int) -> str:
    return "".join(simulated_text("Hello", 0)[:n])


@pytest.mark.parametrize("code", EXPECTED_CODES)
async def test_each_code_ends_both_protocols_the_same_way(server, client, code, caplog):
    simulate = {"fail_after_tokens": 4, "fail_with": code}
    with caplog.at_level(logging.INFO, logger="refimpl"):
        content, sse_error, _, trace = await sse_failure(server, client, simulate)
        async with open_chat(server) as ws:
            ws_content, ws_error = await turn(ws, simulate=simulate)
            assert ws_error["type"] == "error"
            again, done = await turn(ws)  # the socket stays usable
            assert done["type"] == "done" and again == tokens_text(24)
    assert content == ws_content == tokens_text(4)
    assert (
        sse_error["error"]
        == ws_error["error"]
        == {
            "message": f"The model failed while generating ({code}).",
            "type": expected_type(code),
            "param": None,
            "code": code,
        }
    )
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", code)
    # One warning line per failed generation (SSE, then WebSocket), no traceback.
    lines = [r for r in caplog.records if r.name == "refimpl"]
    assert [r.levelname for r in lines] == ["WARNING", "WARNING"]
    assert trace["id"] in lines[0].getMessage() and code in lines[0].getMessage()
    assert all(r.exc_info is None for r in lines)


async def test_a_bug_in_the_backend_is_internal_error_with_a_traceback_in_the_log(server, client, caplog):
    simulate = {"fail_after_tokens": 2, "fail_with": "crash"}
    with caplog.at_level(logging.INFO, logger="refimpl"):
        content, sse_error, events, trace = await sse_failure(server, client, simulate)
        async with open_chat(server) as ws:
            ws_content, ws_error = await turn(ws, simulate=simulate)
    assert content == ws_content == tokens_text(2)
    assert sse_error["error"] == ws_error["error"]
    assert sse_error["error"]["code"] == "internal_error"
    assert sse_error["error"]["type"] == "server_error"
    assert all(CRASH_TEXT not in e.data for e in events)  # no internals leak
    assert CRASH_TEXT not in json.dumps(ws_error)
    assert trace["events"][-1]["detail"] == "internal_error"
    bugs = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(bugs) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in bugs)
    assert trace["id"] in bugs[0].getMessage()


async def test_generation_timeout_ends_a_silent_model(start_server, client, autojump_clock):
    server = await start_server(generation_timeout=1.5, heartbeat=0.5)
    content, error, _events, trace = await sse_failure(server, client, {"ttft_ms": 60_000})
    assert content == ""
    assert error["error"]["code"] == "timeout" and error["error"]["type"] == "server_error"
    assert error["error"]["message"] == "The generation did not finish within 1.5 s."
    names = [e["name"] for e in trace["events"]]
    assert names == ["accepted", "heartbeat", "heartbeat", "error"]  # pings until the deadline
    accepted, ended = trace["events"][0], trace["events"][-1]
    assert ended["at"] - accepted["at"] == pytest.approx(1.5)


async def test_generation_timeout_ends_a_busy_model_too(start_server, client, autojump_clock):
    """A model that never falls silent is stopped by the same deadline."""
    server = await start_server(generation_timeout=1.05)
    simulate = {"ttft_ms": 0, "itl_ms": 100, "tokens": 1000}
    content, error, _, trace = await sse_failure(server, client, simulate)
    assert error["error"]["code"] == "timeout"
    ended = trace["events"][-1]
    assert (ended["name"], ended["detail"]) == ("error", "timeout")
    # Token 1 at t=0, then one every 100 ms: 11 are out before t=1.05.
    assert ended["tokens"] == 11 and content == tokens_text(11)
    assert ended["at"] - trace["events"][0]["at"] == pytest.approx(1.05)


async def test_generation_timeout_on_the_websocket_leaves_the_socket_usable(start_server, autojump_clock):
    server = await start_server(generation_timeout=2.0)
    async with open_chat(server) as ws:
        await ws.send_message(json.dumps({"type": "chat", "messages": [{"role": "user", "content": "Hello"}],
                                          "simulate": {"ttft_ms": 60_000}}))  # fmt: skip
        with trio.fail_after(10):
            _, error = await finish_turn(ws)
        assert error["type"] == "error" and error["error"]["code"] == "timeout"
        _, done = await turn(ws)
        assert done["type"] == "done"


async def test_no_generation_timeout_by_default(start_server, client, autojump_clock):
    """Off unless asked: a ten-minute TTFT still streams (the heartbeat keeps
    the client's 10 s read timeout from firing)."""
    server = await start_server(heartbeat=5)
    _resp, events = await read_events(
        client, server.url, chat_body(stream=True, simulate={"ttft_ms": 600_000})
    )
    assert events[-1].data == "[DONE]"


async def test_a_bug_in_the_sse_writer_still_ends_with_an_error_event(server, client, monkeypatch, caplog):
    """Not only the backend: an exception in our own framing code mid-stream
    gives the client an error event, not a truncated body."""
    from refimpl.protocols import sse_chat

    real, calls = sse_chat.ChunkFramer.content, []

    def content(self, tokens):
        calls.append(tokens)
        if len(calls) == 3:
            raise ValueError("framing bug")
        return real(self, tokens)

    monkeypatch.setattr(sse_chat.ChunkFramer, "content", content)
    with caplog.at_level(logging.INFO, logger="refimpl"):
        content_text, error, _events, trace = await sse_failure(server, client, {"itl_ms": 1})
    assert content_text == "".join(t for batch in calls[:2] for t in batch)
    assert error["error"]["code"] == "internal_error" and "framing bug" not in json.dumps(error)
    # Recorded like a bug in a backend: an error, counted in errors_total.
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", "internal_error")
    (bug,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert bug.exc_info[0] is ValueError and trace["id"] in bug.getMessage()


async def test_a_bug_in_the_websocket_writer_is_an_error_message_and_the_socket_stays(
    server, monkeypatch, caplog
):
    """The WebSocket writer the same way: the turn ends with an error message
    (not a close 1000 with no word), and the next turn works."""
    from refimpl.protocols import websocket_chat

    real, calls = websocket_chat.token_message, []

    def token_message(tokens):
        calls.append(tokens)
        if len(calls) == 2:
            raise ValueError("framing bug")
        return real(tokens)

    monkeypatch.setattr(websocket_chat, "token_message", token_message)
    with caplog.at_level(logging.INFO, logger="refimpl"):
        async with open_chat(server) as ws:
            content, error = await turn(ws, simulate={"itl_ms": 1})
            assert error["type"] == "error" and error["error"]["code"] == "internal_error"
            assert "framing bug" not in json.dumps(error)
            assert content == "".join(calls[0])
            _, done = await turn(ws)
            assert done["type"] == "done"
    trace = await server.trace(error["id"])
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", "internal_error")
    (bug,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert bug.exc_info[0] is ValueError and trace["id"] in bug.getMessage()


async def test_a_generation_the_server_cancels_ends_with_an_error_event(server, client):
    """``Engine.cancel_all`` (what shutdown will call once it drains, issue
    "Error cases II"): a stream gets an error event naming the reason, and a
    request that is not streamed a 503 with Retry-After."""
    body = chat_body(stream=True, simulate={"ttft_ms": 60_000})
    async with trio.open_nursery() as nursery:
        results = {}

        async def stream():
            results["stream"] = await read_events(client, server.url, body)

        async def plain():
            results["plain"] = await client.post(
                server.url + URL, json=chat_body(simulate={"ttft_ms": 60_000})
            )

        nursery.start_soon(stream)
        nursery.start_soon(plain)
        with trio.fail_after(10):
            while len(server.engine.active) < 2:
                await trio.testing.wait_all_tasks_blocked()
        server.engine.cancel_all("shutdown")
    _, events = results["stream"]
    assert events[-1].type == "error" and json.loads(events[-1].data)["error"]["code"] == "server_shutdown"
    assert all(e.data != "[DONE]" for e in events)
    resp = results["plain"]
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_shutdown"
    assert resp.headers["retry-after"] == "1"


async def test_an_unknown_fail_with_is_a_400_naming_the_choices(server, client):
    body = chat_body(stream=True, simulate={"fail_after_tokens": 1, "fail_with": "boom"})
    resp = await client.post(server.url + URL, json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == ("simulate.fail_with", "invalid_value")
    assert error["message"] == f"'simulate.fail_with' must be one of {sorted(FAIL_WITH)}."
    assert not server.engine.active
