"""The two commands a new user runs: ``refimpl serve`` and ``refimpl chat``.

Both run as real subprocesses, the way the README tells people to run them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from refimpl.model import simulated_text

PY = sys.executable


async def start_serve(*flags: str, **popen: object) -> tuple[trio.Process, str]:
    """``refimpl serve --port 0`` as a subprocess, and the URL its first line names."""
    proc = await trio.lowlevel.open_process(
        [PY, "-m", "refimpl", "serve", "--port", "0", "--ttft-ms", "0", "--itl-ms", "0", *flags],
        stdout=subprocess.PIPE,
        **popen,
    )
    with trio.fail_after(30):
        first_line = b""
        while not first_line.endswith(b"\n"):
            first_line += await proc.stdout.receive_some(1)
    return proc, first_line.decode().split(" on ")[1].split()[0]


async def test_serve_then_chat_then_ctrl_c():
    proc, url = await start_serve()
    try:
        assert url.startswith("http://127.0.0.1:")
        chat = await trio.run_process(
            [PY, "-m", "refimpl", "chat", "Hello there", "--url", url, "--tokens", "20"],
            capture_stdout=True,
        )
        out = chat.stdout.decode()
        text, stats = out.strip().split("\n")[-2:]
        assert text == "".join(simulated_text("Hello there", 0)[:20])
        assert stats.startswith("TTFT ") and "20 tokens in 20 messages" in stats  # SSE: one event per token
        assert "'completion_tokens': 20" in stats
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0  # Ctrl-C is a clean stop, not a traceback


@pytest.mark.parametrize("protocol", ["sse", "ws", "grpc"])
async def test_chat_over_each_protocol_streams_the_same_text(server, protocol):
    chat = await trio.run_process(
        [PY, "-m", "refimpl", "chat", "Hello there", "--url", server.url, "--protocol", protocol],
        capture_stdout=True,
    )
    text, stats = chat.stdout.decode().strip().split("\n")[-2:]
    assert text == "".join(simulated_text("Hello there", 0)[:24])
    assert "'completion_tokens': 24" in stats


async def test_chat_over_grpc_interrupted_cancels_the_generation(server):
    """Ctrl-C in ``refimpl chat --protocol grpc``: a clean exit, and grpcio
    resets the stream, so the server stops the model (client_cancel)."""
    proc = await trio.lowlevel.open_process(
        [PY, "-m", "refimpl", "chat", "hi", "--url", server.url, "--protocol", "grpc", "--itl-ms", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with trio.fail_after(30):
        while not server.engine.active:  # the call arrived and its model runs
            await trio.testing.wait_all_tasks_blocked()
        gen = next(iter(server.engine.active.values()))
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 130
        await gen.ended.wait()
    assert (gen.trace.events[-1].name, gen.trace.events[-1].detail) == ("cancelled", "client_cancel")
    assert b"Traceback" not in await proc.stderr.receive_some(65536)


@pytest.mark.parametrize("protocol", ["sse", "grpc"])
async def test_chat_reports_unreachable_server(protocol):
    result = await trio.run_process(
        [PY, "-m", "refimpl", "chat", "hi", "--url", "http://127.0.0.1:9", "--protocol", protocol],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert b"cannot reach" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("protocol", ["sse", "grpc"])
async def test_chat_prints_server_errors(server, protocol):
    result = await trio.run_process(
        [PY, "-m", "refimpl", "chat", "hi", "--url", server.url, "--model", "nope", "--protocol", protocol],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1 and b"model_not_found" in result.stderr


async def test_serve_on_a_taken_port_says_so():
    """A second `make run` on a busy port: one clear line and exit 1, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await trio.run_process(
            [PY, "-m", "refimpl", "serve", "--port", str(port)], capture_stderr=True, check=False
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use".encode() in result.stderr
    assert b"Traceback" not in result.stderr
