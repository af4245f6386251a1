"""What one connection leaves behind when it fails or its client leaves: nothing.

Two bugs the fault load found (lesson 14).  A client that hangs up right
after its request, before its stream's body starts, left its generation
running for good (``Engine.serving`` ends it now).  And an exception in one
connection's handler ended the server (``refimpl/hypercorn_contain.py``).

The real failure that once ended the server (a 415 racing hypercorn's own 400
on one socket, ``trio.BusyResourceError``) is fixed at its cause and proven
by ``tests/test_fuzz_server.py``.  What these tests prove is the defence in
depth: *any* exception that leaves hypercorn's connection handler is logged
with its traceback and closes that connection, while the server, and the
other connections it holds, serve on.  No such exception can be caused for
real any more (that is the point of fixing the causes), so one is injected:
hypercorn's HTTP/1.1 protocol raises for one path.
"""

from __future__ import annotations

import logging
import socket
import struct

import httpx
import hypercorn.protocol.h11 as hypercorn_h11
import pytest
import trio
import trio.testing
from conftest import chat_body

from refimpl import hypercorn_patches
from refimpl.hypercorn_contain import ContainedTCPServer
from refimpl.jsonwire import dumps

STOCK_CHECK_PROTOCOL = hypercorn_h11.H11Protocol._check_protocol


class Injected(Exception):
    """A bug in hypercorn's protocol code, stood in for."""


async def raising_for_boom(self, event) -> None:
    if event.target == b"/boom":
        raise Injected("an exception no connection handler catches")
    await STOCK_CHECK_PROTOCOL(self, event)


@pytest.mark.parametrize("fastwrite", ["1", "0"])
async def test_an_exception_in_one_connection_closes_it_and_the_server_serves_on(
    start_server, monkeypatch, caplog, fastwrite
):
    monkeypatch.setenv("REFIMPL_FASTWRITE", fastwrite)
    monkeypatch.setattr(hypercorn_h11.H11Protocol, "_check_protocol", raising_for_boom)
    caplog.set_level(logging.INFO, logger="refimpl")
    server = await start_server()
    assert issubclass(hypercorn_patches.hypercorn_run.TCPServer, ContainedTCPServer)
    host, port = server.url.removeprefix("http://").split(":")
    async with httpx.AsyncClient(trust_env=False) as before:
        # A keep-alive connection opened before the failure...
        assert (await before.get(server.url + "/v1/models")).status_code == 200
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await stream.receive_some(1024) == b""  # the failing connection: closed
        # ...serves on, and a new connection is accepted.
        assert (await before.get(server.url + "/v1/models")).status_code == 200
    async with httpx.AsyncClient(trust_env=False) as after:
        assert (await after.get(server.url + "/v1/models")).status_code == 200
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.name == "refimpl" and record.getMessage().startswith("a connection from (")
    assert record.getMessage().endswith("failed; closed it, serving on")
    assert record.exc_info is not None and record.exc_info[1].subgroup(Injected) is not None


async def test_a_client_that_leaves_before_its_stream_starts_leaves_no_generation(start_server):
    """The fault load's leaked generation.  The client sends a streamed
    request and resets the connection at once: mostly the request dies
    before its route runs, but now and then the route has started the
    generation and the body that would end it never starts.  Before the fix
    each of those stayed in ``engine.active`` for good (64 of 64, one run)."""
    server = await start_server()
    registry = server.engine.metrics.registry
    host, port = server.url.removeprefix("http://").split(":")
    body = dumps(chat_body(stream=True, simulate={"tokens": 10_000, "itl_ms": 10})).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    async def request_then_reset() -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST: the server hears of it at once

    def started() -> float:
        return registry.get_sample_value("refimpl_generations_total") or 0

    with trio.fail_after(20):
        while started() < 20:  # enough requests that got as far as their generation
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(request_then_reset)
        await trio.testing.wait_all_tasks_blocked()  # the server has handled every reset
    with trio.fail_after(10):  # a leaked generation never ends
        await server.engine.wait_idle()
    cancelled = registry.get_sample_value("refimpl_cancellations_total", {"reason": "client_disconnect"})
    assert cancelled == started()  # each one ended, as a client that left
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(server.url + "/v1/debug/generations")).json() == {"object": "list", "data": []}


async def test_the_running_generations_are_listed_with_their_traces(start_server):
    """``GET /v1/debug/generations``: what holds the active gauge up, to find a leak by."""
    server = await start_server()
    body = chat_body(stream=True, simulate={"tokens": 10_000, "itl_ms": 10})
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            gen_id = resp.headers["x-request-id"]
            listing = (await http.get(server.url + "/v1/debug/generations")).json()
        [running] = listing["data"]
        assert running["id"] == gen_id and not running["finished"]
        assert running["events"][0]["name"] == "accepted"
        with trio.fail_after(10):
            await server.engine.get(gen_id).ended.wait()  # left: cancelled, and the list is empty
        assert (await http.get(server.url + "/v1/debug/generations")).json()["data"] == []
