"""``GET /metrics``: the histograms and counters people chart (``refimpl/metrics.py``, lesson 14).

One real server per test, real clients: httpx for SSE and the non-streaming
form, ``trio-websocket`` for the WebSocket, stock ``grpcio`` for gRPC.  Each
test scrapes ``/metrics`` the way Prometheus does and parses it with
``prometheus_client.parser``, then checks what one stream must have changed:
a TTFT observation with the stream's protocol, ``tokens - 1`` inter-token
gaps, a duration with the right outcome (``done``, ``error``, ``cancelled``),
at least as many bytes sent as the client received, and the gauges back to
0.  The paused-streams gauge is watched while a raw socket with a tiny
receive buffer reads nothing, on trio's virtual clock.  The example Grafana
dashboard is checked against a real scrape, so it cannot drift from the
names.  Waits are on ``Generation.ended`` and trio's quiescence, never on
sleeps; no duration is asserted.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import grpc
import pytest
import trio
import trio.testing
from conftest import chat_body
from prometheus_client.parser import text_string_to_metric_families
from test_fastwrite import posted
from test_grpc import request, stub_for, target
from test_websocket import chat, ended, open_chat, running

from refimpl.examples import scrape_metrics

URL = "/v1/chat/completions"
TOKENS = 24  # conftest's TEST_SIMULATE


async def scrape(client, server) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    text = (await client.get(server.url + "/metrics")).raise_for_status().text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def quiet(server) -> None:
    """Every generation over and every writer out of its ``finally``."""
    with trio.fail_after(10):
        await server.engine.wait_idle()
        await trio.testing.wait_all_tasks_blocked()


# -- one stream per protocol -------------------------------------------------------
async def sse_stream(client, server) -> int:
    async with client.stream("POST", server.url + URL, json=chat_body(stream=True)) as resp:
        return sum([len(raw) async for raw in resp.aiter_raw()])


async def http_answer(client, server) -> int:
    resp = await client.post(server.url + URL, json=chat_body())
    return len(resp.raise_for_status().content)


async def ws_turn(client, server) -> int:
    received = 0
    async with open_chat(server) as ws:
        await ws.send_message(chat())
        while True:
            with trio.fail_after(10):
                raw = await ws.get_message()
            received += len(raw.encode())
            if json.loads(raw)["type"] != "token":
                return received


async def grpc_call(client, server) -> int:
    def call() -> int:
        with grpc.insecure_channel(target(server)) as channel:
            return sum(c.ByteSize() for c in stub_for(channel).StreamChat(request(), timeout=10))

    return await trio.to_thread.run_sync(call)


STREAMS = {"sse": sse_stream, "http": http_answer, "websocket": ws_turn, "grpc": grpc_call}


@pytest.mark.parametrize("protocol", STREAMS)
async def test_one_stream_is_one_ttft_tokens_minus_one_gaps_and_one_duration(server, client, protocol):
    received = await STREAMS[protocol](client, server)
    await quiet(server)
    m = await scrape(client, server)
    p = {"protocol": protocol}
    assert value(m, "refimpl_time_to_first_token_seconds_count", **p) == 1
    assert value(m, "refimpl_inter_token_latency_seconds_count", **p) == TOKENS - 1
    assert value(m, "refimpl_generation_duration_seconds_count", **p, outcome="done") == 1
    assert value(m, "refimpl_tokens_total") == TOKENS
    # The client's bytes are the payload (a WebSocket message's JSON, gRPC's
    # protobuf messages without their 5-byte frame headers): at most what
    # the server counted.
    assert value(m, "refimpl_sent_bytes_total", **p) >= received > 0
    assert value(m, "refimpl_active_generations") == 0
    assert value(m, "refimpl_paused_streams") == 0
    # The other protocols saw nothing (the scrapes themselves are "http").
    others = [name for name in STREAMS if name != protocol]
    assert all(value(m, "refimpl_time_to_first_token_seconds_count", protocol=o) == 0 for o in others)


async def test_a_bucket_count_is_cumulative_and_ends_in_the_total(server, client):
    await sse_stream(client, server)
    await quiet(server)
    m = await scrape(client, server)
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in m.items()
        if name == "refimpl_inter_token_latency_seconds_bucket"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), TOKENS - 1)


# -- outcomes -----------------------------------------------------------------------
async def test_a_mid_stream_failure_is_an_error_duration(server, client):
    body = chat_body(stream=True, simulate={"fail_after_tokens": 3, "fail_with": "overloaded"})
    async with client.stream("POST", server.url + URL, json=body) as resp:
        await resp.aread()
    await quiet(server)
    m = await scrape(client, server)
    assert value(m, "refimpl_generation_duration_seconds_count", protocol="sse", outcome="error") == 1
    assert value(m, "refimpl_errors_total", reason="overloaded") == 1
    assert value(m, "refimpl_inter_token_latency_seconds_count", protocol="sse") == 3 - 1


async def test_a_client_that_leaves_is_a_cancelled_duration(server, client):
    body = chat_body(stream=True, simulate={"ttft_ms": 0, "itl_ms": 60_000})
    async with client.stream("POST", server.url + URL, json=body) as resp:
        gen = server.engine.get(resp.headers["x-request-id"])
        async for raw in resp.aiter_raw():
            if b'"content":"' in raw and b'"role"' not in raw:
                break  # one token arrived; the next is a minute away: hang up
    await ended(gen)
    await quiet(server)
    m = await scrape(client, server)
    cancelled = {"protocol": "sse", "outcome": "cancelled"}
    assert value(m, "refimpl_generation_duration_seconds_count", **cancelled) == 1
    assert value(m, "refimpl_cancellations_total", reason="client_disconnect") == 1
    assert value(m, "refimpl_time_to_first_token_seconds_count", protocol="sse") == 1
    assert value(m, "refimpl_active_generations") == 0


# -- backpressure ---------------------------------------------------------------------
BIG = {"ttft_ms": 0, "itl_ms": 0, "tokens": 10**7}  # more than any socket buffer holds


async def test_a_stalled_reader_is_a_paused_stream_until_it_leaves(start_server, autojump_clock):
    server = await start_server(stall_timeout=None)
    paused = server.engine.metrics.registry.get_sample_value
    assert paused("refimpl_paused_streams") == 0
    async with posted(server.url, chat_body(stream=True, simulate=BIG), rcvbuf=4096):
        gen = await running(server)
        await trio.testing.wait_all_tasks_blocked()  # the write is stuck
        await trio.sleep(1)  # virtual time: long past PAUSE_AFTER
        assert paused("refimpl_paused_streams") == 1
        assert not gen.finished
    await ended(gen)  # the client hung up
    await trio.testing.wait_all_tasks_blocked()
    assert paused("refimpl_paused_streams") == 0
    assert paused("refimpl_active_generations") == 0


# -- the dashboard and the notebook's scraper -----------------------------------------
def dashboard_names() -> set[str]:
    text = resources.files("refimpl.examples").joinpath("grafana-dashboard.json").read_text()
    exprs = [t["expr"] for panel in json.loads(text)["panels"] for t in panel.get("targets", [])]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\brefimpl_[a-z_]+", expr)}


async def test_every_metric_the_dashboard_charts_exists(server, client):
    """After one stream, every name in a PromQL query of the example
    dashboard is a sample of ``/metrics`` or (a labelled counter no one has
    touched yet) a family there with that sample's suffix."""
    await sse_stream(client, server)
    await quiet(server)
    text = (await client.get(server.url + "/metrics")).text
    families = list(text_string_to_metric_families(text))
    samples = {s.name for f in families for s in f.samples}
    declared = {f.name + suffix for f in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    missing = {name for name in dashboard_names() if name not in samples | declared}
    assert not missing


async def test_the_scraper_turns_scrapes_into_series(server, client):
    async def load() -> None:
        for _ in range(3):
            await sse_stream(client, server)

    series = await scrape_metrics.scrape_during(server.url, load, every_ms=1, window_s=3600)
    assert len(series.t) >= 2 and series.t == sorted(series.t)
    assert series.tokens[-1] == 3 * TOKENS
    assert series.active[-1] == 0
    assert len(series.tokens_per_s) == len(series.t) and series.ttft_p50[-1] is not None
