"""Lesson 04's clients against a real server: text, usage, and leaving early.

Each client of ``refimpl/examples/client_streams.py`` streams from a real
refimpl server on 127.0.0.1:0, called the way lesson 04 shows it, and we pin
what the application gets:

1. the text is exactly the non-streamed answer's, with and without usage;
2. usage is the server's when the request asks for it, and absent when it
   does not, except LiteLLM's, which it counts itself and gets wrong;
3. a reader that has seen three pieces and stops makes the client close the
   connection, and the server's trace ends ``cancelled(client_disconnect)``
   (a normal end would be ``done``, minutes later); ``break`` alone does not
   close an openai stream, nor a LiteLLM one.

What each does with a mid-stream ``event: error`` is lesson 07's
(``tests/test_midstream_clients.py``).  The Node clients, the fetch readers
and ``EventSource`` are ``tests/js/clients_*.test.mjs``, run by
:func:`test_node_clients` against a server of this process.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing
from test_midstream_clients import node_test

from refimpl.examples import client_streams
from refimpl.examples.client_streams import CLIENTS, USAGE_FIELDS, Ask
from refimpl.examples.client_timelines import run_client

JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
# A million tokens, one every 5 ms: about 80 minutes.  Only a cancel ends it soon.
LONG = {"ttft_ms": 0, "itl_ms": 5, "tokens": 1_000_000}


async def until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


async def non_streamed(client, server, ask: Ask) -> dict:
    body = {**ask.body(), "stream": False}
    body.pop("stream_options", None)
    answer = (await client.post(f"{server.url}/v1/chat/completions", json=body)).json()
    return {"text": answer["choices"][0]["message"]["content"], "usage": answer["usage"]}


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include_usage"])
@pytest.mark.parametrize("name", list(CLIENTS))
async def test_same_text_as_the_non_streamed_answer(server, client, name, include_usage):
    ask = Ask(simulate={"tokens": 40, "seed": 3}, include_usage=include_usage)
    answer = await non_streamed(client, server, ask)
    reading = await run_client(CLIENTS[name], server.url, ask)
    assert reading.text == answer["text"] and len(answer["text"]) > 100
    if include_usage:
        assert reading.usage == answer["usage"]
    elif name == "LiteLLM":
        # stream_chunk_builder counted the tokens itself (its own tokenizer,
        # not the model's) and reports that as the usage, with no sign that
        # it is an estimate.
        assert set(reading.usage) == USAGE_FIELDS
        assert reading.usage["prompt_tokens"] != answer["usage"]["prompt_tokens"]
        assert reading.usage["completion_tokens"] != answer["usage"]["completion_tokens"]
    else:
        assert reading.usage is None


async def leave_after_three(server, name: str):
    """Run one client with a reader that stops after three pieces; return
    what it read and the server's generation."""
    seen: list[str] = []
    ids: set[str] = set()

    def three(piece: str) -> bool:  # called in the client's thread
        seen.append(piece)
        ids.update(server.engine.active)  # the one generation running: this client's
        return len(seen) < 3

    reading = await run_client(CLIENTS[name], server.url, Ask(simulate=LONG), three)
    (gen_id,) = ids
    return reading, seen, server.engine.get(gen_id)


@pytest.mark.parametrize("name", list(CLIENTS))
async def test_leaving_early_stops_the_model(server, name):
    reading, seen, gen = await leave_after_three(server, name)
    assert len(seen) == 3 and reading.text == "".join(seen)
    with trio.fail_after(10):
        await gen.ended.wait()
    last = gen.trace.events[-1]
    assert (last.name, last.detail) == ("cancelled", "client_disconnect")


async def test_openai_break_alone_leaves_the_model_running(server):
    """The broken version: the loop is over, the response is not.  The model
    goes on for nobody until the stream is closed, or collected."""
    text, stream = await trio.to_thread.run_sync(
        client_streams.openai_break_only, server.url, Ask(simulate=LONG), 3
    )
    (gen,) = server.engine.active.values()
    assert text and not stream.response.is_closed
    made = gen.completion_tokens
    await until(lambda: gen.completion_tokens >= made + 20)  # 20 more tokens, read by no one
    assert not gen.finished
    await trio.to_thread.run_sync(stream.close)  # the fix: close it (or `with ... as stream`)
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.events[-1].detail == "client_disconnect"


async def test_openai_stream_is_closed_only_by_the_garbage_collector(server):
    """Dropping the last name of a left stream does not close it: the stream
    and its generator refer to each other, so only the cycle collector does."""
    left: list = []  # the one reference to the stream (a thread's return value may linger)

    def leave() -> None:
        left.append(client_streams.openai_break_only(server.url, Ask(simulate=LONG), 3)[1])

    gc.disable()  # no collection at a moment of the interpreter's choosing
    try:
        await trio.to_thread.run_sync(leave)
        (gen,) = server.engine.active.values()
        response = left[0].response
        left.clear()  # no name refers to the stream any more ...
        assert not response.is_closed  # ... and it is still open
        gc.collect()
        assert response.is_closed
    finally:
        gc.enable()
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.events[-1].detail == "client_disconnect"


def litellm_break_only(url: str, ask: Ask):
    """LiteLLM read the way its docs show, left with ``break``: no close()."""
    import litellm

    stream = litellm.completion(
        model=f"openai/{client_streams.MODEL}",
        api_base=f"{url}/v1",
        api_key="unused",
        messages=ask.messages,
        stream=True,
        extra_body=ask.extra_body(),
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    return stream


async def test_litellm_break_alone_leaves_the_model_running(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    stream = await trio.to_thread.run_sync(litellm_break_only, server.url, Ask(simulate=LONG))
    (gen,) = server.engine.active.values()
    assert not hasattr(stream, "close")  # the sync wrapper has only an async aclose()
    made = gen.completion_tokens
    await until(lambda: gen.completion_tokens >= made + 20)
    assert not gen.finished
    await trio.to_thread.run_sync(stream.completion_stream.close)  # the SDK stream inside
    with trio.fail_after(10):
        await gen.ended.wait()
    assert gen.trace.events[-1].detail == "client_disconnect"


# -- the Node clients, the fetch readers and EventSource ----------------------
NODE_TESTS = sorted(JS.glob("clients_*.test.mjs"))


async def test_node_clients(server):
    assert len(NODE_TESTS) == 3
    # EventSource is a global in Node 22+; Node 20 has it behind this flag.
    await node_test(server.url, NODE_TESTS, "--experimental-eventsource")
