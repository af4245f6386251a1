"""Fixtures for tests across processes: a throwaway Redis, and a cluster.

A test module imports the ones it uses, as other tests import helpers from
their neighbours (``tests/`` is on ``sys.path``)::

    from cluster_fixtures import cluster_fixture, redis_fixture  # noqa: F401

    async def test_resume_on_another_worker(cluster):
        c = await cluster(workers=2, resume_grace=5)
        ...  # c.url (nginx), c.workers[i].url / .pid / .kill(), c.redis

    async def test_store_survives_a_restart(redis):
        redis.kill()
        await trio.to_thread.run_sync(redis.restart)

pytest finds the imported fixtures in the test module (so ``F401``, unused,
is wrong here); they are *named* ``cluster`` and ``redis``, so a test's
parameter does not shadow the import.  Both tear everything down at the end of the test.  Where ``redis-server``
(or, for ``cluster``, nginx) is missing, the test is skipped, and in CI
(``CI`` set, as ``.ci/run`` does) it fails instead: there a skip would hide
a missing test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from refimpl.examples.cluster import Cluster
from refimpl.examples.nginx_proxy import NginxNotFound, find_nginx
from refimpl.examples.redis_server import RedisNotFound, RedisServer, find_redis


def require(find: Callable[[], str]) -> None:
    """Skip the test when ``find`` says a tool is missing, or fail it in CI."""
    try:
        find()
    except (RedisNotFound, NginxNotFound) as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


def serve_flags(**settings: object) -> list[str]:
    """``resume_grace=2, quiet=True`` -> ``["--resume-grace", "2", "--quiet"]``."""
    flags: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


@pytest.fixture(name="redis")
async def redis_fixture() -> AsyncIterator[RedisServer]:
    """A running ``redis-server`` on a free loopback port; ``redis.url`` for ``--store``."""
    require(find_redis)
    async with RedisServer() as server:
        yield server


@pytest.fixture(name="cluster")
async def cluster_fixture() -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """``await cluster(workers=2, **serve_flags)``: a started :class:`Cluster`.

    Keywords ``port``, ``read_timeout`` and ``redis`` (a running
    :class:`RedisServer` to share) go to the cluster; every other keyword
    becomes a ``refimpl serve`` flag (``serve_flags``), after
    ``--ttft-ms 0 --itl-ms 0`` (fast, as in ``test_cli.start_serve``; a
    keyword or a request's ``simulate`` overrides them)."""
    require(find_redis)
    require(find_nginx)
    async with AsyncExitStack() as stack:

        async def start(
            workers: int = 2,
            *,
            port: int | None = None,
            read_timeout: float = 60.0,
            redis: RedisServer | None = None,
            **settings: object,
        ) -> Cluster:
            flags = ["--ttft-ms", "0", "--itl-ms", "0", *serve_flags(**settings)]
            made = Cluster(workers, port=port, read_timeout=read_timeout, redis=redis, serve_args=flags)
            return await stack.enter_async_context(made)

        yield start  # then the stack stops each cluster, the last started first
