"""The check of exercise 07: three ways to fail, one way to succeed.

A model that fails after 3 tokens (``"simulate": {"fail_after_tokens": 3}``),
a request refused before the stream (an unknown model: 404), and a route
added for this check whose body ends cleanly after two tokens with no
``[DONE]``: a server that closed its response early.
"""

from __future__ import annotations

import pytest
import trio
from conftest import chat_body, sse_chunk
from quart import Response
from quart_trio import QuartTrio

from refimpl.model import simulated_text

TEXT = simulated_text("Hello", 0)


async def read(exercise, client, url, body):
    with trio.fail_after(10):
        return await exercise.read_answer(client, url, body)


def failed_quietly(text: str, why: str) -> str:
    partial = ": your user would take a partial answer for a whole one" if text else ""
    return f"{why}, and read_answer returned {text!r} instead of raising StreamFailed{partial}"


async def test_a_complete_answer(exercise, start_server, client, autojump_clock):
    server = await start_server()
    body = chat_body(simulate={"ttft_ms": 0, "itl_ms": 10, "tokens": 6})
    assert await read(exercise, client, server.url, body) == "".join(TEXT[:6])


async def test_an_error_event_raises(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    body = chat_body(simulate={"itl_ms": 10, "tokens": 20, "fail_after_tokens": 3, "fail_with": "overloaded"})
    try:
        text = await read(exercise, client, server.url, body)
    except exercise.StreamFailed as failed:
        observe("fail_after_tokens=3, overloaded: StreamFailed.error", failed.error)
        assert failed.error.get("code") == "overloaded", "pass the server's error object on"
    else:
        pytest.fail(failed_quietly(text, "the model failed after 3 tokens"), pytrace=False)


async def test_a_refusal_raises(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    try:
        text = await read(exercise, client, server.url, {**chat_body(), "model": "gpt-nothing"})
    except exercise.StreamFailed as failed:
        observe("an unknown model: StreamFailed.error", failed.error)
        assert failed.error.get("code") == "model_not_found", "pass the server's error object on"
    else:
        pytest.fail(failed_quietly(text, "the server answered 404"), pytrace=False)


CUT = "/cut"


def cut_route(app: QuartTrio) -> None:
    """Two tokens, then the body ends cleanly: no error event, no [DONE]."""

    @app.post(CUT + "/v1/chat/completions")
    async def cut() -> Response:
        async def body():
            yield sse_chunk({"role": "assistant", "content": ""})
            yield sse_chunk({"content": "Half"})
            yield sse_chunk({"content": " an"})

        return Response(body(), content_type="text/event-stream")


async def test_a_body_without_done_raises(exercise, start_server, client, autojump_clock, observe):
    server = await start_server(None, cut_route)
    try:
        text = await read(exercise, client, server.url + CUT, chat_body())
    except exercise.StreamFailed as failed:
        observe("a body that ends without [DONE]: StreamFailed.error", failed.error)
    else:
        pytest.fail(failed_quietly(text, "the body ended without [DONE]"), pytrace=False)
