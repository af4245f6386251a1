"""The set-up behind the cross-process resume tests (issue 13): a throwaway
Redis (``refimpl/examples/redis_server.py``) and a cluster of refimpl
processes behind nginx (``refimpl/examples/cluster.py``).

What is checked here is the plumbing, not resuming: Redis answers, comes
back empty on the same port after a crash, and is never confused with
somebody else's; nginx deals requests to every worker in turn and sends a
dead worker's share to a live one; nothing is left running afterwards.
Every wait is on real state (a reply, a log line, a process exit), never a
sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import coredis
import httpx
import pytest
import trio
from cluster_fixtures import cluster_fixture, redis_fixture, require  # noqa: F401 (fixtures)
from conftest import chat_body

from refimpl.examples.cluster import Cluster
from refimpl.examples.nginx_proxy import find_nginx
from refimpl.examples.redis_server import RedisServer, find_redis, server_pid

WORKER = "X-Refimpl-Worker"


def our_children() -> set[int]:
    """The pids of this process's children (Linux: each thread lists its own)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


async def stream_text(client: httpx.AsyncClient, url: str) -> tuple[str, bytes]:
    """POST a streamed chat; the worker that answered and the whole body."""
    async with client.stream("POST", url + "/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status_code == 200
        return resp.headers[WORKER], b"".join([chunk async for chunk in resp.aiter_raw()])


async def test_redis_answers_then_comes_back_empty_on_the_same_port(redis):
    assert server_pid(redis.port) == redis.pid
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        await client.set("refimpl:test", "kept?")
        assert await client.get("refimpl:test") == "kept?"
    port, crashed = redis.port, redis.pid

    redis.kill()
    assert server_pid(port) is None  # the port refuses: a crash, not a shutdown
    await trio.to_thread.run_sync(redis.restart)

    assert (redis.port, redis.url) == (port, f"redis://127.0.0.1:{port}/0")
    assert server_pid(port) == redis.pid != crashed
    async with coredis.Redis.from_url(redis.url, decode_responses=True) as client:
        assert await client.get("refimpl:test") is None  # no persistence: nothing survived


async def test_a_port_that_runs_another_redis_is_not_taken_for_ours(redis):
    """That Redis would answer PING; ours exits "Address already in use"."""
    with pytest.raises(RuntimeError, match="Address already in use"):
        await trio.to_thread.run_sync(RedisServer(redis.port).start)
    assert server_pid(redis.port) == redis.pid  # the first one is untouched


async def test_nginx_deals_requests_to_every_worker_in_turn(cluster, client):
    c = await cluster(workers=2)
    pids = {str(w.pid) for w in c.workers}
    assert len(pids) == 2 and all(w.alive() and w.url != c.url for w in c.workers)
    assert c.redis.running() and server_pid(c.redis.port) == c.redis.pid

    answered = [(await client.get(c.url + "/v1/models")).headers[WORKER] for _ in range(4)]
    assert set(answered) == pids
    assert answered[0] != answered[1]  # round-robin: consecutive requests, different workers
    worker, body = await stream_text(client, c.url)
    assert worker in pids and body.endswith(b"data: [DONE]\n\n")


async def test_a_killed_workers_share_goes_to_the_live_one(cluster, client):
    c = await cluster(workers=2)
    dead, live = c.workers
    dead.kill()
    assert not dead.alive()

    # Four requests in turn: at least one is first sent to the dead worker.
    answered = [(await client.get(c.url + "/v1/models")).headers[WORKER] for _ in range(2)]
    answered += [(await stream_text(client, c.url))[0] for _ in range(2)]  # POSTs too
    assert answered == [str(live.pid)] * 4
    assert "Connection refused" in c.proxy.read_errors()  # nginx tried it, then moved on


async def test_stopping_a_cluster_leaves_no_process_behind(client):
    require(find_redis)
    require(find_nginx)
    before = our_children()
    async with Cluster(workers=2) as c:
        started = {w.pid for w in c.workers} | {c.redis.pid, c.proxy._proc.pid}
        assert started <= our_children() - before
        assert (await client.get(c.url + "/v1/models")).status_code == 200
    assert our_children() == before
    with pytest.raises(httpx.ConnectError):  # nginx is gone, and so are the workers
        await client.get(c.url)
    for worker in c.workers:
        with pytest.raises(httpx.ConnectError):
            await client.get(worker.url)


async def test_cli_prints_the_urls_and_stops_everything_on_ctrl_c(client):
    require(find_redis)
    require(find_nginx)
    argv = [sys.executable, "-m", "refimpl.examples.cluster", "--port", "0", "--h2c-port", "0"]
    argv += ["--redis-port", "0", "--workers", "2", "--quiet"]  # --quiet goes to refimpl serve
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(60):  # bounded: the workers import, start and answer
            out = b""
            while b"  redis " not in out and proc.returncode is None:
                out += await proc.stdout.receive_some()
        lines = out.decode().splitlines()
        url = lines[0].split()[1]  # "cluster: http://127.0.0.1:PORT  (h2c: ...)"
        worker_urls = [line.split()[3] for line in lines if line.startswith("  worker ")]
        assert len(worker_urls) == 2
        assert (await stream_text(client, url))[1].endswith(b"data: [DONE]\n\n")

        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        assert b"Traceback" not in await proc.stderr.receive_some()
        for gone in [url, *worker_urls]:
            with pytest.raises(httpx.ConnectError):
                await client.get(gone)
    finally:
        if proc.returncode is None:  # the test failed midway
            proc.terminate()  # the CLI stops everything on SIGTERM too
            await proc.wait()
