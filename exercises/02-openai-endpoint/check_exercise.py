"""The check of exercise 02: your collector against the non-streamed answer.

The same request sent with ``"stream": false`` is the reference: the same
text, the same usage (DESIGN §2: the two must agree).  Runs on trio's
virtual clock, so the server's "slow" endings cost no real time.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import trio
from conftest import chat_body, sse_chunk
from quart import Response
from quart_trio import QuartTrio

TOKENS = 7


async def collect(exercise, client, url, body):
    """Your collect(), with a word on the two classic mistakes."""
    try:
        with trio.fail_after(5):
            return await exercise.collect(client, url, body)
    except IndexError as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        why = (
            f"IndexError at {Path(where.filename).name}:{where.lineno}: {where.line}\n"
            'The usage chunk has "choices": [] (lesson 02, "The answer, chunk by chunk", item 4).'
        )
    except trio.TooSlowError:
        why = "collect() was still reading 5 s after data: [DONE]: [DONE] is the end of the answer."
    pytest.fail(why, pytrace=False)


async def test_text_usage_and_finish_reason(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    body = chat_body(simulate={"ttft_ms": 100, "itl_ms": 10, "tokens": TOKENS})
    answer = await collect(exercise, client, server.url, body)
    whole = (await client.post(f"{server.url}/v1/chat/completions", json=body)).json()
    observe(f"tokens={TOKENS}: chunks before [DONE]", answer.chunks)
    observe("usage", answer.usage)
    assert answer.text == whole["choices"][0]["message"]["content"]
    assert answer.finish_reason == "stop"
    assert answer.usage == whole["usage"]
    assert answer.chunks == TOKENS + 3, "the role chunk, one per token, the final chunk, the usage chunk"


async def test_max_tokens_cuts_the_answer(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    body = chat_body(max_tokens=3, simulate={"tokens": 10})
    answer = await collect(exercise, client, server.url, body)
    observe(
        "max_tokens=3 of 10: finish_reason, completion_tokens",
        (answer.finish_reason, (answer.usage or {}).get("completion_tokens")),
    )
    assert answer.finish_reason == "length"
    assert answer.usage["completion_tokens"] == 3


# -- a server that keeps the body open after [DONE] ---------------------------
LINGER = "/linger"


def lingering_route(app: QuartTrio) -> None:
    """A complete answer, then a body that stays open for a minute, as a
    buffering proxy or a server with a slow shutdown may do."""

    @app.post(LINGER + "/v1/chat/completions")
    async def linger() -> Response:
        async def body():
            yield sse_chunk({"role": "assistant", "content": ""})
            yield sse_chunk({"content": "Hi"})
            yield sse_chunk({}, "stop")
            yield b"data: [DONE]\n\n"
            await trio.sleep(60)

        response = Response(body(), content_type="text/event-stream")
        response.timeout = None
        return response


async def test_done_is_the_end(exercise, start_server, client, autojump_clock):
    server = await start_server(None, lingering_route)
    answer = await collect(exercise, client, server.url + LINGER, chat_body())
    assert (answer.text, answer.finish_reason) == ("Hi", "stop")
