"""POST /v1/chat/completions over SSE, read with real clients on loopback.

The wire contract (DESIGN §2): role chunk, content chunks, final chunk with
finish_reason, usage chunk when asked, ``data: [DONE]``; the same id /
created / model on every chunk; headers that switch buffering off.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
import trio
from conftest import chat_body
from httpx_sse import aconnect_sse

from refimpl.sse import SSEParser


async def read_events(client: httpx.AsyncClient, url: str, body: dict):
    """POST and parse the whole stream with our parser; returns (response, events)."""
    parser = SSEParser()
    events = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        async for raw in resp.aiter_raw():
            events += parser.feed(raw)
    events += parser.close()
    return resp, events


async def test_chunk_sequence_and_headers(server, client):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    resp, events = await read_events(client, server.url, body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["connection"] == "keep-alive"
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all(e.type == "message" for e in events)
    first, *content, final, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == 24  # TEST_SIMULATE.tokens: one chunk per token
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 24
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 24
    # usage is null on every chunk before the usage chunk (OpenAI's convention)
    assert all(c["usage"] is None for c in chunks[:-1])
    ids = {(c["id"], c["created"], c["model"], c["object"]) for c in chunks}
    assert ids == {(resp.headers["x-request-id"], first["created"], "refimpl-sim", "chat.completion.chunk")}


async def test_no_usage_chunk_unless_asked(server, client):
    _, events = await read_events(client, server.url, chat_body(stream=True))
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_stream_equals_non_stream(server, client):
    body = chat_body("Tell me about streams", seed=7)
    full = (await client.post(server.url + "/v1/chat/completions", json=body)).json()
    _, events = await read_events(client, server.url, {**body, "stream": True})
    text = "".join(json.loads(e.data)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": text, "refusal": None}
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] == 24


async def test_max_tokens_gives_length(server, client):
    for key in ("max_tokens", "max_completion_tokens"):
        full = (await client.post(server.url + "/v1/chat/completions", json=chat_body(**{key: 5}))).json()
        assert full["choices"][0]["finish_reason"] == "length"
        assert full["usage"]["completion_tokens"] == 5


async def test_stop_sequence_ends_before_it(server, client):
    body = chat_body(seed=1)
    text = (await client.post(server.url + "/v1/chat/completions", json=body)).json()["choices"][0][
        "message"
    ]["content"]
    stop = text.split()[3]
    cut = (await client.post(server.url + "/v1/chat/completions", json={**body, "stop": [stop]})).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


async def test_mid_stream_error_event_then_clean_end(server, client):
    body = chat_body(stream=True, simulate={"fail_after_tokens": 5, "fail_with": "overloaded"})
    resp, events = await read_events(client, server.url, body)
    assert resp.status_code == 200
    assert [e.type for e in events[-1:]] == ["error"]
    assert all(e.data != "[DONE]" for e in events)  # a failed stream never says DONE
    error = json.loads(events[-1].data)["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"
    contents = [json.loads(e.data)["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert len(contents) == 5  # everything made before the failure was delivered
    trace = await server.trace(resp.headers["x-request-id"])
    assert trace["events"][-1]["name"] == "error" and trace["events"][-1]["detail"] == "overloaded"


async def test_httpx_sse_client(server, client):
    body = chat_body(stream=True)
    async with aconnect_sse(client, "POST", server.url + "/v1/chat/completions", json=body) as source:
        datas = [sse.data async for sse in source.aiter_sse()]
    assert datas[-1] == "[DONE]" and len(datas) == 24 + 3


async def test_curl_shows_chunks(server):
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI"):
            pytest.fail("curl is required in CI")
        pytest.skip("curl not installed")
    body = json.dumps(chat_body(stream=True))
    cmd = [
        curl,
        "-sN",
        server.url + "/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    out = await trio.run_process(cmd, capture_stdout=True)
    lines = [block for block in out.stdout.decode().split("\n\n") if block]
    assert lines[-1] == "data: [DONE]" and len(lines) == 24 + 3


async def test_large_stream_is_exact(server, client):
    """Many tokens written in batches still arrive as one event per token, in order."""
    body = chat_body(stream=True, simulate={"tokens": 5000})
    _, events = await read_events(client, server.url, body)
    text = "".join(json.loads(e.data)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    full = (await client.post(server.url + "/v1/chat/completions", json={**body, "stream": False})).json()
    assert text == full["choices"][0]["message"]["content"]
    assert len(events) == 5000 + 3


async def test_lone_surrogate_in_a_prompt_is_served(server, client):
    """JSON may carry a lone surrogate ("\\ud800"); it must not crash the
    model's seeding (strict UTF-8 refuses to encode it)."""
    raw = b'{"model":"refimpl-sim","messages":[{"role":"user","content":"\\ud800"}]}'
    resp = await client.post(
        server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 24
