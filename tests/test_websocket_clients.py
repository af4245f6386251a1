"""``/v1/ws/chat`` from the other clients people use (lesson 03).

* the ``websockets`` package on asyncio, run in a worker thread (the test's
  own loop is trio): two turns, a cancel and a model error on one socket,
  then the close codes it sees for a binary frame and an oversized message;
* our own client, ``refimpl/ws_client.py``, directly and through
  ``refimpl chat --protocol ws`` as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import trio
from test_websocket import SLOW, chat, running
from test_websocket import ws_url as server_ws_url
from websockets.asyncio.client import connect as websockets_connect
from websockets.exceptions import ConnectionClosedError

from refimpl.client import StreamError
from refimpl.model import simulated_text
from refimpl.ws_client import connect, ws_url

PY = sys.executable


# -- websockets (asyncio) -----------------------------------------------------
async def websockets_conversation(url: str) -> list[list[dict]]:
    """Runs on asyncio: four turns on one socket, every message of each."""
    turns: list[list[dict]] = []
    async with websockets_connect(url) as ws:

        async def turn(request: str, cancel_after: int | None = None) -> None:
            await ws.send(request)
            messages = []
            while not messages or messages[-1]["type"] == "token":
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                if len(messages) == cancel_after:
                    await ws.send('{"type":"cancel"}')
            turns.append(messages)

        await turn(chat())
        await turn(chat(max_tokens=4))
        await turn(chat(simulate=SLOW), cancel_after=1)
        await turn(chat(simulate={"fail_after_tokens": 2}))
    return turns


async def websockets_close_code(url: str, message: str | bytes) -> int:
    async with websockets_connect(url) as ws:
        await ws.send(message)
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    return closed.value.rcvd.code


def on_asyncio(fn, *args):
    return trio.to_thread.run_sync(lambda: asyncio.run(fn(*args)))


async def test_websockets_client_turns_cancel_and_error(server):
    full, short, cancelled, failed = await on_asyncio(websockets_conversation, server_ws_url(server))
    assert "".join(m.get("content", "") for m in full) == "".join(simulated_text("Hello", 0)[:24])
    assert full[-1]["type"] == "done" and full[-1]["usage"]["total_tokens"] == 25
    assert short[-1]["usage"]["completion_tokens"] == 4 and short[-1]["finish_reason"] == "length"
    assert [m["type"] for m in cancelled] == ["token", "cancelled"]
    assert (await server.trace(cancelled[-1]["id"]))["events"][-1]["detail"] == "client_cancel"
    assert "".join(m.get("content", "") for m in failed) == "".join(simulated_text("Hello", 0)[:2])
    assert failed[-1]["type"] == "error" and failed[-1]["error"]["code"] == "model_error"
    assert not server.engine.active


async def test_websockets_client_sees_the_close_codes(start_server):
    server = await start_server(ws_max_message_bytes=1024)
    url = server_ws_url(server)
    assert await on_asyncio(websockets_close_code, url, b"\x00") == 1003
    assert await on_asyncio(websockets_close_code, url, "x" * 1025) == 1009


# -- our client -----------------------------------------------------------------
@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/v1/ws/chat"),
        ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/v1/ws/chat"),
        ("https://example.com", "wss://example.com/v1/ws/chat"),
        ("ws://h:1/other/path", "ws://h:1/other/path"),
        ("ws://h:1", "ws://h:1/v1/ws/chat"),
    ],
)
def test_ws_url(given, expected):
    assert ws_url(given) == expected


async def test_ws_client_turns_cancel_and_error(server):
    with trio.fail_after(30):
        async with connect(server.url) as ws:
            first = [e async for e in ws.chat("Hello")]
            second = [e async for e in ws.chat([{"role": "user", "content": "Hi"}], max_tokens=2)]
            cancelled = []
            async for event in ws.chat("Hello", simulate=SLOW):
                cancelled.append(event)
                if event.type == "token":
                    await ws.cancel()
            failed = [e async for e in ws.chat("Hello", simulate={"fail_after_tokens": 0})]
    assert "".join(e.content for e in first) == "".join(simulated_text("Hello", 0)[:24])
    assert first[-1].type == "done" and first[-1].usage["completion_tokens"] == 24
    assert first[0].at <= first[-1].at
    assert second[-1].finish_reason == "length"
    assert [e.type for e in cancelled] == ["token", "cancelled"] and cancelled[-1].reason == "client_cancel"
    assert [e.type for e in failed] == ["error"] and failed[0].error["code"] == "model_error"
    assert failed[0].id


async def test_ws_client_raises_when_the_socket_closes_mid_turn(start_server):
    server = await start_server(ws_max_message_bytes=100)
    with trio.fail_after(30):
        async with connect(server.url) as ws:
            with pytest.raises(StreamError) as err:
                async for _ in ws.chat("x" * 200):
                    pass
    assert err.value.error["code"] == 1009


async def test_ws_client_cancel_from_another_task(server):
    with trio.fail_after(30):
        async with connect(server.url) as ws, trio.open_nursery() as nursery:
            events = ws.chat("Hello", simulate={"ttft_ms": 60_000})

            async def cancel_when_running() -> None:
                await running(server)
                await ws.cancel()

            nursery.start_soon(cancel_when_running)
            final = [e async for e in events][-1]
    assert final.type == "cancelled" and final.usage["completion_tokens"] == 0


# -- refimpl chat --protocol ws -----------------------------------------------------
async def refimpl_chat(*args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(30):
        return await trio.run_process(
            [PY, "-m", "refimpl", "chat", *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def test_cli_chat_over_websocket(server):
    result = await refimpl_chat(
        "Hello there", "--url", server.url, "--protocol", "ws", "--tokens", "20", "--itl-ms", "1"
    )
    assert result.returncode == 0, result.stderr
    text, stats = result.stdout.decode().strip().split("\n")[-2:]
    assert text == "".join(simulated_text("Hello there", 0)[:20])
    assert stats.startswith("TTFT ") and "'completion_tokens': 20" in stats
    (gen,) = [g for g in server.engine._recent.values() if g.protocol == "websocket"]
    assert gen.trace.names() == ["accepted", "first_token", "done"]


async def test_cli_chat_over_websocket_reports_errors(server):
    result = await refimpl_chat("hi", "--url", server.url, "--protocol", "ws", "--max-tokens", "0")
    assert result.returncode == 1 and b"'max_tokens' must be an integer" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_cli_chat_over_websocket_unreachable():
    result = await refimpl_chat("hi", "--url", "http://127.0.0.1:9", "--protocol", "ws")
    assert result.returncode == 1 and b"cannot reach" in result.stderr
    assert b"Traceback" not in result.stderr
