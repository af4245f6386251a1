"""The two commands a new user runs: ``refimpl serve`` and ``refimpl chat``.

Both run as real subprocesses, the way the README tells people to run them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import trio

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


async def test_chat_reports_unreachable_server():
    result = await trio.run_process(
        [PY, "-m", "refimpl", "chat", "hi", "--url", "http://127.0.0.1:9"],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert b"cannot reach" in result.stderr and b"Traceback" not in result.stderr


async def test_chat_prints_server_errors(server):
    result = await trio.run_process(
        [PY, "-m", "refimpl", "chat", "hi", "--url", server.url, "--model", "nope"],
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
