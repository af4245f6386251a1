"""The official openai SDK, unchanged, pointed at our server.

The SDK is the strictest client we have: it parses every chunk into typed
models.  Sync calls run in a worker thread (the server shares this test's
trio loop, so blocking here would deadlock it); the async client runs on its
own asyncio loop in a thread, which is how most applications use it.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import trio

from refimpl.model import simulated_text

MODEL = "refimpl-sim"
MESSAGES = [{"role": "user", "content": "Why should tokens stream?"}]


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def sync_round_trip(url: str) -> tuple:
    client = sync_client(url)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    return full, chunks


async def test_sync_sdk_stream_equals_non_stream(server):
    full, chunks = await trio.to_thread.run_sync(sync_round_trip, server.url)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.completion_tokens == 24


async def test_async_sdk_on_asyncio(server):
    async def run() -> tuple[str, object]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"simulate": {"tokens": 10}},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        full = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"simulate": {"tokens": 10}}
        )
        await client.close()
        return text, usage, full

    text, usage, full = await trio.to_thread.run_sync(asyncio.run, run())
    assert text == full.choices[0].message.content
    assert usage == full.usage and usage.completion_tokens == 10


def sdk_stream_until_error(url: str) -> tuple[str, openai.APIError]:
    stream = sync_client(url).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_body={"simulate": {"fail_after_tokens": 3, "fail_with": "overloaded"}},
    )
    text = ""
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    return text, info.value


async def test_sdk_raises_on_mid_stream_error(server):
    text, err = await trio.to_thread.run_sync(sdk_stream_until_error, server.url)
    # Exactly the three tokens made before the failure were delivered.
    assert text == "".join(simulated_text(MESSAGES[0]["content"], 0)[:3])
    assert err.body["code"] == "overloaded"


def sdk_bad_requests(url: str) -> list[openai.APIStatusError]:
    client = sync_client(url)
    errors = []
    for kwargs in (
        {"model": "gpt-unknown", "messages": MESSAGES},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": MESSAGES, "n": 2},
    ):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kwargs)
        errors.append(info.value)
    return errors


async def test_sdk_sees_typed_errors(server):
    not_found, empty, n2 = await trio.to_thread.run_sync(sdk_bad_requests, server.url)
    assert isinstance(not_found, openai.NotFoundError) and not_found.code == "model_not_found"
    assert isinstance(empty, openai.BadRequestError) and empty.param == "messages"
    assert isinstance(n2, openai.BadRequestError) and n2.param == "n"
