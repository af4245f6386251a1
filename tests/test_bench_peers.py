"""The bench's peer servers stream what refimpl streams (lesson 13).

A peer's CPU per token only compares with refimpl's if it sends the same
thing.  Each peer the bench knows (``benchload.SERVERS``) is started the way
the bench starts it (``benchload.running_server``: the bench's command line,
a free port, ready once ``GET /v1/models`` answers) and sent the bench's own
request (``benchload.request_body``).  Its chunks must be refimpl's, field
for field but for the stream's id, creation time and fingerprint; only the
line separator may differ, and that is pinned here too.  A paced stream is
read with the bench's own reader (``benchload.one_stream``), which records a
short stream or a missing ``[DONE]`` as an error.  Nothing here sleeps or
times anything.
"""

from __future__ import annotations

import json

import httpx
import pytest

from refimpl import benchload
from refimpl.model import count_tokens, simulated_text, simulated_token
from refimpl.sse import SSEParser

# The line separator each peer's SSE framing writes (a new peer needs a line here).
SEPARATORS = {
    "sse-starlette": b"\r\n",  # sse-starlette's default
    "starlette": b"\n",  # framed by hand, like refimpl
    "quart-asyncio": b"\n",
}
SERVER_TOKENS = 12  # --tokens: what a request without "simulate" gets
# What the bench's request asks for: more than len(simulated_text) (about a
# hundred), so the text wraps, where a space starts it over (simulated_token).
REQUEST = benchload.Plan(streams=1, tokens=250)


@pytest.fixture(params=[kind for kind, script in benchload.SERVERS.items() if script is not None])
async def peer(request):
    """(kind, URL) of a running peer, stopped after the test."""
    async with benchload.running_server(request.param, benchload.Plan(1, SERVER_TOKENS)) as (_, url):
        yield request.param, url


async def post(url: str, body: dict) -> tuple[bytes, list[str]]:
    """The whole response body, and the data of each event in it."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        resp = await client.post(url + "/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    parser = SSEParser()
    return resp.content, [e.data for e in parser.feed(resp.content) + parser.close()]


def comparable(data: list[str]) -> list[object]:
    """The events without what differs between any two streams."""
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        del chunk["id"], chunk["created"], chunk["system_fingerprint"]
    return [*chunks, data[-1]]


async def test_peer_streams_what_refimpl_streams(peer, server):
    kind, url = peer
    body = benchload.request_body(0, REQUEST)
    raw, data = await post(url, body)

    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    role, *content, final, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # One chunk per token, the simulated model's text for this prompt.
    prompt = body["messages"][0]["content"]
    text = simulated_text(prompt, 0)
    tokens = [simulated_token(text, n) for n in range(REQUEST.tokens)]
    assert [c["choices"][0]["delta"] for c in content] == [{"content": t} for t in tokens]
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    p = count_tokens(prompt)
    assert usage["choices"] == []
    n = REQUEST.tokens
    assert usage["usage"] == {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1

    # The same events as refimpl's, in the same order.
    _, refimpl_data = await post(server.url, body)
    assert comparable(data) == comparable(refimpl_data)

    # Every event ends in a blank line, written with the peer's separator.
    sep = SEPARATORS[kind]
    assert raw.count(sep + sep) == len(data) and raw.endswith(sep + sep)
    assert (b"\r" in raw) == (sep == b"\r\n")


async def test_peer_takes_its_defaults_from_the_command_line(peer):
    _, url = peer
    body = {"model": "refimpl-sim", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    _, data = await post(url, body)
    assert len(data) == 1 + SERVER_TOKENS + 1 + 1  # role, tokens, final, [DONE]: no usage unasked
    assert "usage" not in json.loads(data[0])


async def test_paced_stream_completes(peer):
    _, url = peer
    load = benchload.Load()
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        paced = benchload.Plan(streams=1, tokens=REQUEST.tokens, itl_ms=5)
        await benchload.one_stream(client, url, benchload.request_body(1, paced), load)
    assert load.errors == []
    assert load.tokens == paced.tokens and len(load.itl) == paced.tokens - 1
