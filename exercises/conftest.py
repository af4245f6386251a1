"""What every exercise's check needs: the learner's file, a real server, a report.

``exercise``
    the module the check is about: ``<exercise dir>/exercise.py`` (the
    learner's), or ``<exercise dir>/solution/exercise.py`` with
    ``--solution``.  A file that does not import fails the check at once,
    with Python's own error.
``start_server(config, *routes)``
    a refimpl server on ``127.0.0.1:0`` in the test's nursery, as
    ``tests/conftest.py`` starts them: the app from ``create_app``, served
    by hypercorn's trio worker, with extra routes registered first (a check
    may add a misbehaving route of its own).  pytest-trio cancels the
    nursery when the check ends, which stops the server.  Checks that ask
    for ``autojump_clock`` run client, server and model on trio's virtual
    clock: a 60-second answer costs no real time, and times are exact.
``observe(what, value)``
    a line for the learner, printed after the checks ("what your code
    measured"), so a prediction can be compared with a number even when
    everything passes.
``chat_body(...)``, ``sse_chunk(delta)``
    a chat request's body; one chunk's SSE bytes, for a route of a check's own.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart_trio import QuartTrio

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.engine import Engine
from refimpl.model import Simulate
from refimpl.sse import encode

#: Fast defaults: real timing, but short (the checks pass their own knobs).
FAST = Simulate(ttft_ms=0, itl_ms=0, tokens=24)
_OBSERVED = pytest.StashKey[list[tuple[str, str, str]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--solution",
        action="store_true",
        help="check solution/exercise.py (the reference solution) instead of exercise.py",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_OBSERVED] = []


@pytest.fixture
def exercise(request: pytest.FixtureRequest) -> Any:
    folder = Path(request.path).parent
    path = (
        folder / "solution" / "exercise.py"
        if request.config.getoption("--solution")
        else folder / "exercise.py"
    )
    name = "exercise_" + folder.name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def observe(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    folder = Path(request.path).parent.name

    def note(what: str, value: object) -> None:
        request.config.stash[_OBSERVED].append((folder, what, str(value)))

    return note


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """Show the one failure inside pytest-trio's nursery, not the group
    around it: a learner should see their assertion, first."""
    excinfo = call.excinfo
    while (
        excinfo is not None
        and isinstance(excinfo.value, BaseExceptionGroup)
        and len(excinfo.value.exceptions) == 1
    ):
        excinfo = pytest.ExceptionInfo.from_exception(excinfo.value.exceptions[0])
    call.excinfo = excinfo


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    observed = config.stash[_OBSERVED]
    if observed:
        terminalreporter.section("what your code measured")
        for folder, what, value in observed:
            terminalreporter.write_line(f"{folder}: {what}: {value}")


@dataclass
class Server:
    url: str
    app: QuartTrio

    @property
    def engine(self) -> Engine:
        return self.app.extensions["refimpl.engine"]

    async def trace(self, gen_id: str) -> dict[str, Any]:
        """``GET /v1/debug/generations/{id}``: what the server did."""
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{self.url}/v1/debug/generations/{gen_id}")
            resp.raise_for_status()
            return resp.json()


@pytest.fixture
def start_server(nursery: Any) -> Callable[..., Any]:
    async def start(
        config: Config | None = None, *routes: Callable[[QuartTrio], None], **changes: Any
    ) -> Server:
        app = create_app(replace(config or Config(simulate=FAST), **changes))
        for add_route in routes:
            add_route(app)
        return Server(await nursery.start(partial(serve, app)), app)

    return start


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=None) as c:  # the checks put their own deadlines
        yield c


def chat_body(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": "refimpl-sim", "messages": [{"role": "user", "content": content}], **extra}


def sse_chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    """One ``chat.completion.chunk`` event, for a check's own misbehaving route."""
    chunk = {"id": "chatcmpl-check", "object": "chat.completion.chunk", "created": 0, "model": "refimpl-sim"}
    return encode(
        json.dumps({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
    )
