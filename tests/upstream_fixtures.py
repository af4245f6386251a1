"""Fixtures for ``test_upstream.py``: a second ``refimpl serve`` as the upstream.

``upstream`` is one real ``refimpl serve`` process shared by the module's
tests (it starts in about a second; each test makes its own generations and
reads their traces by id, so they do not see each other's).  ``start_upstream``
starts one of the test's own, for a test that kills it.  Both serve the model
``UPSTREAM_MODEL`` so that a test can tell the upstream's list from ours.

``garbage_upstream(nursery, answer)`` is the one fault a real server cannot
be made to commit: a raw trio TCP server that reads a request and answers
``answer`` -- broken SSE, not SSE, not HTTP at all.

A test module imports the ones it uses (``tests/`` is on ``sys.path``)::

    from upstream_fixtures import start_upstream_fixture, upstream_fixture  # noqa: F401
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import pytest
import trio

from refimpl.examples.cluster import Worker

#: The one model the upstream serves (``--model-name``).
UPSTREAM_MODEL = "upstream-llm"
#: The key the upstream wants (``REFIMPL_API_KEY`` in its environment), and
#: the variable our server reads it from (``--upstream-key-env``).
UPSTREAM_KEY = "sk-upstream-test-key"
KEY_ENV = "REFIMPL_TEST_UPSTREAM_KEY"
#: Headers for a test that talks to the upstream directly.
UPSTREAM_AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


def upstream_worker(log: Path, *flags: str) -> Worker:
    """``refimpl serve --port 0`` as a subprocess: fast simulated tokens, a
    key like a hosted model's (its model list and traces public, so that
    ``Worker.wait_ready`` and the tests' trace reads need none)."""
    serve = [sys.executable, "-m", "refimpl", "serve", "--port", "0", "--ttft-ms", "0", "--itl-ms", "0"]
    public = ["--public-path", "/v1/models", "--public-path", "/v1/debug/*"]
    with pytest.MonkeyPatch.context() as env:  # only the child process sees it
        env.setenv("REFIMPL_API_KEY", UPSTREAM_KEY)
        return Worker([*serve, "--tokens", "24", "--model-name", UPSTREAM_MODEL, *public, *flags], log)


@pytest.fixture(name="upstream", scope="module")
def upstream_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One upstream for the module: ``upstream.url`` is its base URL (no ``/v1``)."""
    worker = upstream_worker(tmp_path_factory.mktemp("upstream") / "upstream.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()  # no drain: nothing of it is tested after the last test


@pytest.fixture(name="start_upstream")
async def start_upstream_fixture(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """``await start_upstream(*flags)``: a started upstream of the test's own."""
    async with AsyncExitStack() as stack:
        numbers = itertools.count(1)

        async def start(*flags: str) -> Worker:
            worker = upstream_worker(tmp_path / f"upstream-{next(numbers)}.log", *flags)
            stack.callback(worker.kill)
            await trio.to_thread.run_sync(worker.wait_ready)
            return worker

        yield start


# region: garbage-upstream
async def garbage_upstream(nursery: trio.Nursery, answer: bytes, *, close: bool = True) -> str:
    """A TCP server that answers every POST with ``answer`` (then closes, or
    holds the connection open) and every GET with a 404; its base URL."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            if not (data := await stream.receive_some(65536)):
                return
            request += data
        head, _, body = request.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:  # read it all, so that closing sends FIN, not RST
            body += await stream.receive_some(65536)
        if head.startswith(b"GET"):
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        else:
            await stream.send_all(answer)
            if not close:
                await trio.sleep_forever()  # the test's nursery ends it
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{host}:{port}"


# endregion: garbage-upstream
