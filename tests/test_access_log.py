"""The access log (``refimpl/access_log.py``): one line per request and per
WebSocket turn on the server terminal, none with ``--quiet``, none in a
server that ``refimpl serve`` did not start (tests, notebooks).

The in-process tests capture the ``refimpl.access`` logger with pytest's
``caplog``; the last two run ``refimpl serve`` as a subprocess and read its
stderr, the way a teacher sees it.
"""

from __future__ import annotations

import logging
import signal
import subprocess

import httpx
import pytest
import trio
from conftest import chat_body
from test_cli import start_serve
from test_websocket import chat, finish_turn, open_chat


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="refimpl.access")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "refimpl.access"]


async def test_a_stream_is_one_line_when_it_ends(server, client, access):
    resp = await client.post(server.url + "/v1/chat/completions", json=chat_body(stream=True))
    gen_id = resp.headers["X-Request-Id"]
    (line,) = [line for line in access() if gen_id in line]
    assert line.startswith("sse POST /v1/chat/completions 200 " + gen_id + " 24 tokens ttft ")
    assert line.endswith(" done(stop)")


async def test_a_failed_non_streamed_request_shows_its_status(server, client, access):
    body = chat_body(simulate={"fail_after_tokens": 3, "fail_with": "overloaded"})
    resp = await client.post(server.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 503
    (line,) = [line for line in access() if resp.headers["X-Request-Id"] in line]
    assert line.startswith("http POST /v1/chat/completions 503 ") and line.endswith("error(overloaded)")


async def test_requests_without_a_generation_are_logged_when_answered(server, client, access):
    await client.get(server.url + "/metrics")
    await client.get(server.url + "/nope")
    await client.post(server.url + "/v1/chat/completions", json={"model": "refimpl-sim"})
    lines = access()
    assert lines[0].startswith("http GET /metrics 200 ") and lines[0].endswith(" ms")
    assert lines[1].startswith("http GET /nope 404 ")
    assert lines[2].startswith("http POST /v1/chat/completions 400 ")


async def test_each_websocket_turn_is_a_line(server, access):
    async with open_chat(server) as ws:
        for _ in range(2):
            await ws.send_message(chat())
            await finish_turn(ws)
    turns = [line for line in access() if line.startswith("websocket WS /v1/ws/chat - ")]
    assert len(turns) == 2 and all(line.endswith("done(stop)") for line in turns)


async def serve_and_request(*flags: str) -> str:
    """Start ``refimpl serve``, make one request, stop it; its stderr."""
    proc, url = await start_serve(*flags, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient() as client:
                await client.post(url + "/v1/chat/completions", json=chat_body(stream=True))
    finally:
        proc.send_signal(signal.SIGINT)
    err = b""
    with trio.fail_after(30):
        while chunk := await proc.stderr.receive_some():
            err += chunk
        assert await proc.wait() == 0
    return err.decode()


async def test_serve_prints_the_access_log_and_quiet_does_not():
    loud, quiet = await serve_and_request(), await serve_and_request("--quiet")
    assert " INFO sse POST /v1/chat/completions 200 chatcmpl-" in loud
    assert "POST /v1/chat/completions" not in quiet
