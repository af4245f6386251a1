"""What real clients do when a stream fails half-way (lesson 07), measured.

The server sends a few tokens, then ``event: error`` and no ``[DONE]``
(DESIGN §3).  Each client of ``refimpl/examples/midstream_clients.py`` reads
that stream from a real server, and we pin exactly what it did: the class it
raised (or none), and the text it handed over first, which must be the
tokens the server sent before failing (the first N tokens of the same prompt
and seed without the failure, N from the failed generation's trace).  A
mid-stream failure must also never be retried: the client made one request.

The Node clients (openai, the Vercel AI SDK, the seed article's fetch reader,
our browser parser) are ``tests/js/midstream_*.test.mjs``, run by ``node
--test`` against the same kind of server.  Their packages come from
``tests/js/package-lock.json`` (``make test`` runs ``npm ci``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import trio
from test_lifecycle import metric

from refimpl.client import StreamError, stream_chat
from refimpl.examples import midstream_clients as clients

FAIL = {"fail_after_tokens": 3, "fail_with": "overloaded", "seed": 7}
OVERLOADED = {
    "message": "The model failed while generating (overloaded).",
    "type": "server_error",
    "param": None,
    "code": "overloaded",
}
JS = Path(__file__).parent / "js"
NODE = shutil.which("node")


def body(simulate: dict) -> dict:
    return {"model": clients.MODEL, "messages": clients.MESSAGES, "simulate": simulate}


async def sent_before_failure(server, client: httpx.AsyncClient, simulate: dict = FAIL) -> str:
    """The text the server sent before failing, read with our own client."""
    ok = {k: v for k, v in simulate.items() if k not in ("fail_after_tokens", "fail_with")}
    whole = [e.content async for e in stream_chat(client, server.url, body(ok)) if e.content]
    ids = []
    with pytest.raises(StreamError):
        async for event in stream_chat(client, server.url, body(simulate)):
            ids.append(event.id)
    trace = await server.trace(ids[0])
    n = trace["completion_tokens"]
    assert trace["finish_reason"] == "error"
    assert 0 < n < len(whole), "the failure came mid-stream"
    return "".join(whole[:n])


async def generations(client: httpx.AsyncClient, server) -> int:
    """How many generations the server has started (each request is one)."""
    return int(metric((await client.get(f"{server.url}/metrics")).text, "refimpl_generations_total"))


def with_openai_async(url: str, simulate: dict) -> clients.Outcome:
    """The async client on its own asyncio loop, in a worker thread."""
    return asyncio.run(clients.with_openai_async(url, simulate))


# client -> the class it raises at the `event: error` (None: it raises nothing)
RAISES = {
    clients.with_openai: "openai.APIError",
    with_openai_async: "openai.APIError",
    clients.with_langchain: "openai.APIError",
    clients.with_litellm: "litellm.exceptions.MidStreamFallbackError",
    clients.with_httpx_sse: None,
    clients.with_naive_reader: "KeyError",
}
# every failure the simulated model can have; "crash" is a real exception in
# the backend, which the client sees as internal_error
CODES = ["overloaded", "timeout", "internal_error", "model_error", "content_filter", "crash"]


async def measure(server, client, run, simulate: dict = FAIL) -> tuple[clients.Outcome, str]:
    """Run one client in a worker thread (the server shares this trio loop);
    return its outcome and the text the server had sent."""
    expected = await sent_before_failure(server, client, simulate)
    before = await generations(client, server)
    outcome = await trio.to_thread.run_sync(run, server.url, simulate)
    assert await generations(client, server) == before + 1, "a mid-stream failure is not retried"
    return outcome, expected


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("run", list(RAISES), ids=lambda f: f.__name__)
async def test_partial_text_then_what_each_client_raises(server, client, run, code):
    outcome, expected = await measure(server, client, run, {**FAIL, "fail_with": code})
    assert outcome.text == expected
    assert outcome.error == RAISES[run]


@pytest.mark.parametrize("run", [clients.with_openai, with_openai_async], ids=["sync", "async"])
async def test_openai_sdk_error_carries_the_error_object(server, client, run):
    outcome, _ = await measure(server, client, run)
    err = outcome.exception
    assert type(err) is openai.APIError  # the base class: mid-stream there is no status
    assert not isinstance(err, openai.APIStatusError)
    assert err.code == "overloaded" and err.type == "server_error"
    assert err.body == OVERLOADED and outcome.message == OVERLOADED["message"]


async def test_langchain_lets_the_sdk_error_through(server, client):
    outcome, _ = await measure(server, client, clients.with_langchain)
    assert type(outcome.exception) is openai.APIError
    assert outcome.exception.body == OVERLOADED


async def test_litellm_mid_stream_fallback_error(server, client):
    outcome, expected = await measure(server, client, clients.with_litellm)
    err = outcome.exception  # litellm.exceptions.MidStreamFallbackError (checked above)
    # It is made for litellm's Router: the text so far, to continue elsewhere.
    assert err.generated_content == expected and err.is_pre_first_chunk is False
    # It subclasses ServiceUnavailableError -> openai.APIStatusError, with a
    # status no server sent; the error code survives only inside the message.
    assert isinstance(err, openai.APIStatusError) and err.status_code == 500
    assert err.code is None and err.body is None
    assert "(overloaded)" in outcome.message
    assert type(err.original_exception).__name__ == "APIConnectionError"  # misfiled as a network fault


async def test_httpx_sse_shows_the_error_event(server, client):
    outcome, _ = await measure(server, client, clients.with_httpx_sse)
    assert outcome.error is None  # httpx-sse raises nothing: the event is ours to read
    assert outcome.error_event == {"error": OVERLOADED}


async def test_naive_reader_trips_over_the_error_data(server, client):
    """Not "silently finished": the error's data line has no "choices", so
    the reader crashes on it, with a KeyError that does not say why."""
    outcome, _ = await measure(server, client, clients.with_naive_reader)
    assert isinstance(outcome.exception, KeyError) and outcome.message == "'choices'"


# -- the Node clients ---------------------------------------------------------
NODE_TESTS = sorted(JS.glob("midstream_*.test.mjs"))


def _node_ready() -> None:
    problem = None
    if NODE is None:
        problem = "node is not installed"
    elif not (JS / "node_modules" / ".package-lock.json").exists():
        problem = "tests/js/node_modules is missing: `make test` (or `npm ci --prefix tests/js`) installs it"
    if problem and os.environ.get("CI"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


async def node_test(url: str, files: list[Path], *flags: str) -> None:
    """``node --test`` on ``files`` against the server at ``url``
    (``REFIMPL_URL``): every test passes, and at least one ran."""
    _node_ready()
    result = await trio.run_process(
        [NODE, *flags, "--test", "--test-reporter=tap", *map(str, files)],
        env={**os.environ, "REFIMPL_URL": url},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, "\n" + output
    assert re.search(r"^# fail 0$", output, re.M) and re.search(r"^# pass [1-9]", output, re.M), output


async def test_node_clients(server):
    assert len(NODE_TESTS) == 4
    await node_test(server.url, NODE_TESTS)
