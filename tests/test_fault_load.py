"""Many misbehaving clients at once against one real server: the invariants hold (lesson 14).

``refimpl bench faults`` (``bench_faults.py``) in CI size: a few seconds,
a few clients of every kind from ``bench_fault_clients.py`` at once against
one in-process server, whose ``refimpl`` logger (hypercorn's error log is a
child of it, ``app.py``) we read for tracebacks.  Every client comes from
127.0.0.1, so the server runs with the per-address limits raised to the
load's size.  No timing is asserted; ``trio.fail_after`` only guards
against a hang.  The larger run, once by hand::

    refimpl bench faults --clients 500 --seconds 60

or this file with ``REFIMPL_FAULT_CLIENTS=500 REFIMPL_FAULT_SECONDS=60``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import pytest
import trio
from conftest import TEST_SIMULATE

from refimpl.bench_fault_clients import KINDS
from refimpl.bench_faults import QUICK, run_faults
from refimpl.config import Config

PLAN = replace(
    QUICK,
    clients=int(os.environ.get("REFIMPL_FAULT_CLIENTS", QUICK.clients)),
    seconds=float(os.environ.get("REFIMPL_FAULT_SECONDS", QUICK.seconds)),
)
ROOM = 4 * PLAN.clients + 64  # every client is 127.0.0.1: the per-address limits out of the way
CONFIG = Config(
    simulate=TEST_SIMULATE,
    max_streams_per_client=ROOM,
    max_connections_per_client=ROOM,
    max_queue=ROOM,
    header_timeout=PLAN.header_timeout,
    body_timeout=PLAN.body_timeout,
)
#: The requests that never complete, and a connection reused after a refusal: lesson 14's
#: "slow and half-sent requests", kept apart so the rest is judged on its own.
UNFINISHED = ("slowloris", "slow_body", "reuse_after_refusal")


@pytest.fixture
def tracebacks(caplog):
    caplog.set_level(logging.INFO, logger="refimpl")
    return lambda: [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_mixed_faults_keep_every_invariant(start_server, tracebacks):
    server = await start_server(CONFIG)
    kinds = tuple(k for k in KINDS if k not in UNFINISHED)
    with trio.fail_after(PLAN.seconds + 60):
        result = await run_faults(server.url, PLAN, tracebacks, kinds)
    assert result["violations"] == {"count": 0, "first": []}
    assert all(result["invariants"].values()), result["invariants"]
    assert server.engine.active == {} and server.engine.queued == {}
    for kind in kinds:  # every kind ran, and finished at least once
        assert sum(result["outcomes"][kind].values()) >= 1, kind


async def test_unfinished_requests_are_refused_or_closed_within_the_run(start_server, tracebacks):
    """A request whose headers or body never end gets 408 or is closed within
    the run (--header-timeout / --body-timeout 1 s here), and a connection
    whose big body was refused unread still answers its next request."""
    server = await start_server(CONFIG)
    plan = replace(PLAN, clients=3 * len(UNFINISHED), seconds=max(PLAN.seconds, 3 * PLAN.body_timeout))
    with trio.fail_after(plan.seconds + 60):
        result = await run_faults(server.url, plan, tracebacks, UNFINISHED)
    assert result["violations"] == {"count": 0, "first": []}, result["outcomes"]
    assert all(result["invariants"].values()), result["invariants"]
