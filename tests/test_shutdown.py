"""Graceful shutdown (``patterns/shutdown.py``; DESIGN §3).

When the shutdown trigger fires: new generations get ``503
server_shutting_down``; running ones may finish for ``drain_timeout``
seconds; the rest end in their own protocol (SSE: ``event: error`` code
``server_shutdown``, no ``[DONE]``; not streamed: ``503 server_shutdown``;
WebSocket: close 1001), each traced ``cancelled(shutdown)``; then the server
stops.  The first test runs on trio's virtual clock; the last two run the
real ``refimpl serve`` command and send it real signals.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio
import trio.testing
from conftest import TEST_SIMULATE, chat_body
from test_sse_endpoint import read_events
from test_websocket import chat
from trio_websocket import ConnectionClosed, open_websocket_url

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.protocols.websocket_chat import PATH

URL = "/v1/chat/completions"
FOREVER = {"ttft_ms": 60_000}  # a model that will not finish during the drain
SHORT = {"ttft_ms": 0, "itl_ms": 100, "tokens": 5}  # finishes within it


async def test_drain_then_end_the_rest_in_each_protocol(nursery, autojump_clock):
    app = create_app(Config(simulate=TEST_SIMULATE, drain_timeout=2.0, retry_after=0.5))
    engine, shutdown = app.extensions["refimpl.engine"], app.extensions["refimpl.shutdown"]
    trigger, stopped = trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    url = await nursery.start(run_server)
    results: dict = {}
    async with httpx.AsyncClient(timeout=30) as client:

        async def stream(name, simulate):
            results[name] = await read_events(client, url, chat_body(stream=True, simulate=simulate))

        async def plain():
            results["plain"] = await client.post(url + URL, json=chat_body(simulate=FOREVER))

        async def websocket(name, simulate):
            async with open_websocket_url(url.replace("http://", "ws://") + PATH) as ws:
                if simulate is not None:
                    await ws.send_message(chat(simulate=simulate))
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                results[name] = closed.value.reason

        async with trio.open_nursery() as clients:
            clients.start_soon(stream, "short", SHORT)
            clients.start_soon(stream, "long", FOREVER)
            clients.start_soon(plain)
            clients.start_soon(websocket, "ws busy", FOREVER)
            clients.start_soon(websocket, "ws idle", None)
            with trio.fail_after(10):
                while len(engine.active) < 4:  # short, long, plain, ws busy
                    await trio.testing.wait_all_tasks_blocked()
            running = list(engine.active.values())
            started = trio.current_time()
            trigger.set()
            with trio.fail_after(10):
                while not shutdown.draining:
                    await trio.testing.wait_all_tasks_blocked()
            refused = await client.post(url + URL, json=chat_body(stream=True))
    with trio.fail_after(30):
        await stopped.wait()  # and the server stopped: never a hang

    # While draining: new work is refused, with a time to come back.
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.headers["retry-after-ms"] == "500"
    # The short stream finished during the drain, normally.
    _, events = results["short"]
    assert events[-1].data == "[DONE]"
    # The others were ended at the drain timeout, each in its own protocol.
    _, events = results["long"]
    error = json.loads(events[-1].data)["error"]
    assert events[-1].type == "error" and error["code"] == "server_shutdown"
    assert all(e.data != "[DONE]" for e in events)
    assert results["plain"].status_code == 503
    assert results["plain"].json()["error"]["code"] == "server_shutdown"
    for name in ("ws busy", "ws idle"):
        assert (results[name].code, results[name].reason) == (1001, "server shutting down")
    for gen in running:
        ending = gen.trace.events[-1]
        if gen.request.simulate.tokens == SHORT["tokens"]:
            assert ending.name == "done"  # finished during the drain
        else:  # sse (long), http, websocket: ended at the drain timeout
            assert (ending.name, ending.detail) == ("cancelled", "shutdown"), gen.protocol
            assert ending.at - started == pytest.approx(2.0)
    assert not engine.active


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def started_serve(port: int, *flags: str) -> trio.Process:
    cmd = [sys.executable, "-m", "refimpl", "serve", "--port", str(port), "--ttft-ms", "0", *flags]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(30):
            while True:
                try:
                    await client.get(f"http://127.0.0.1:{port}/v1/models")
                    return proc
                except httpx.ConnectError:
                    await trio.sleep(0.05)  # polling a process we started, not synchronising tasks


async def draining(port: int) -> None:
    """Until the server answers new work with 503: it has seen the signal.
    (trio merges a signal that arrives again before it was handled, so a
    second signal is only a second one once the first has been.)"""
    async with httpx.AsyncClient() as client:
        for _ in range(600):  # another process: poll it, a bounded number of times
            if (await client.post(f"http://127.0.0.1:{port}{URL}", json=chat_body())).status_code == 503:
                return
            await trio.sleep(0.05)
    raise AssertionError("the server never started draining")


async def read_all(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data.decode()


@pytest.mark.parametrize("signals", [1, 2])
async def test_refimpl_serve_drains_on_sigterm_and_a_second_signal_stops_it_at_once(signals):
    """The real command: SIGTERM with a stream in flight ends that stream with
    an error event after the drain timeout (not a cut body), and the process
    exits 0; a second signal ends the drain at once (the drain timeout here
    is far longer than the test's limit)."""
    port = free_port()
    proc = await started_serve(port, "--drain-timeout", "1" if signals == 1 else "600")
    raw, cut = b"", False
    try:
        async with trio.open_nursery() as nursery:
            stderr = []
            nursery.start_soon(lambda: _collect(proc.stderr, stderr))
            async with httpx.AsyncClient(timeout=60) as client:
                body = chat_body(stream=True, simulate={"ttft_ms": 600_000})
                async with client.stream("POST", f"http://127.0.0.1:{port}{URL}", json=body) as resp:
                    try:
                        async for chunk in resp.aiter_raw():
                            if not raw:  # the role chunk is here: the stream is live
                                proc.send_signal(signal.SIGTERM)
                                if signals == 2:
                                    await draining(port)
                                    proc.send_signal(signal.SIGTERM)
                            raw += chunk
                    except httpx.RemoteProtocolError:
                        cut = True
            with trio.fail_after(30):
                code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert code == 0
    err = "".join(stderr)
    if signals == 1:  # told, not cut
        assert not cut and b"event: error" in raw and b'"code":"server_shutdown"' in raw
        assert b"[DONE]" not in raw
        assert "draining: waiting up to 1 s for 1 generation(s)" in err
    else:  # stopped at once: the stream is cut, which is what a second signal asks for
        assert cut and "second signal: stopping now" in err


async def _collect(stream: trio.abc.ReceiveStream, into: list[str]) -> None:
    into.append(await read_all(stream))
