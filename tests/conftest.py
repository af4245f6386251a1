"""Shared fixtures: a real hypercorn server on 127.0.0.1:0, real clients.

Every test talks to the app the way users do: over a loopback socket, with a
real HTTP client.  ``start_server(config)`` starts another server (with its
own config) in the test's nursery and returns a :class:`Server`; the
``server`` fixture is the default one.  pytest-trio cancels the nursery at the
end of each test, which shuts the servers down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import httpx
import pytest

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.engine import Engine
from refimpl.model import Simulate

# Fast defaults for tests: real timing, but short.
TEST_SIMULATE = Simulate(ttft_ms=0, itl_ms=0, tokens=24)


@dataclass
class Server:
    url: str
    app: Any

    @property
    def engine(self) -> Engine:
        return self.app.extensions["refimpl.engine"]

    async def trace(self, gen_id: str) -> dict:
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{self.url}/v1/debug/generations/{gen_id}")
            resp.raise_for_status()
            return resp.json()


def chat_body(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": "refimpl-sim", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def start_server(nursery):
    async def start(config: Config | None = None, **changes: Any) -> Server:
        config = replace(config or Config(simulate=TEST_SIMULATE), **changes)
        app = create_app(config)
        url = await nursery.start(partial(serve, app))
        return Server(url, app)

    return start


@pytest.fixture
async def server(start_server) -> Server:
    return await start_server()


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(10)) as c:
        yield c


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a missing test: fail the run loudly."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips count as failures here", red=True)
        session.exitstatus = 1
