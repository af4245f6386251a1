"""The check of exercise 00: your timings against the model's clock.

Everything runs on trio's virtual clock (``autojump_clock``): client,
server and model share one loop, so a 500 ms TTFT is exactly 0.5 s and
costs no real time (lesson 00, "The tests make the formulas exact").
"""

from __future__ import annotations

import httpx
from conftest import chat_body
from pytest import approx

from refimpl.examples.timing import time_full

TTFT_MS, ITL_MS, TOKENS = 500, 20, 10
SIMULATE = {"ttft_ms": TTFT_MS, "itl_ms": ITL_MS, "tokens": TOKENS}
E2E = (TTFT_MS + (TOKENS - 1) * ITL_MS) / 1000  # lesson 00: ttft + (tokens - 1) x itl


async def test_time_to_first_text(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    body = chat_body(simulate=SIMULATE)
    streamed = await exercise.time_to_first_text(client, server.url, body)
    full = await time_full(client, server.url, body)
    observe("first text, streamed", f"{streamed:.3f} s" if streamed is not None else streamed)
    observe("first text, stream: false (lesson 00's time_full)", f"{full.ttft:.3f} s")
    assert streamed is not None, "no text arrived at all?"
    assert streamed == approx(TTFT_MS / 1000, abs=1e-6), (
        f"{streamed:.3f} s: the first text was due at ttft_ms = {TTFT_MS} ms"
        + (" (0 s is the role chunk: the first byte, not the first text)" if streamed < 0.001 else "")
    )
    assert full.ttft == approx(E2E, abs=1e-6)  # the non-streamed reader waits for everything


async def test_tpot_from_the_trace(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    resp = await client.post(f"{server.url}/v1/chat/completions", json=chat_body(simulate=SIMULATE))
    trace = await server.trace(resp.json()["id"])
    got = exercise.tpot(trace)
    observe(f"TPOT of a {TOKENS}-token answer at itl_ms={ITL_MS}", f"{got * 1000:.1f} ms")
    assert got == approx(ITL_MS / 1000, abs=1e-6), (
        f"{got * 1000:.1f} ms per token; the model made one every itl_ms = {ITL_MS} ms after the first"
    )


async def test_one_token_streaming_buys_nothing(exercise, start_server, client, autojump_clock, observe):
    """Push on it 1: with one token, first text streamed == the whole answer."""
    server = await start_server()
    body = chat_body(simulate={**SIMULATE, "tokens": 1})
    streamed = await exercise.time_to_first_text(client, server.url, body)
    full = await time_full(client, server.url, body)
    observe("tokens=1: streamed vs full first text", f"{streamed:.3f} s vs {full.ttft:.3f} s")
    assert streamed == approx(full.ttft, abs=1e-6)


async def test_a_real_clock_is_a_little_late(exercise, start_server, observe):
    """The same measurement in real time, no virtual clock: never early."""
    server = await start_server()
    async with httpx.AsyncClient(timeout=10) as client:
        streamed = await exercise.time_to_first_text(client, server.url, chat_body(simulate=SIMULATE))
    observe("first text in real time (ttft_ms=500)", f"{streamed:.3f} s")
    assert TTFT_MS / 1000 <= streamed < TTFT_MS / 1000 + 0.5, f"{streamed:.3f} s, with ttft_ms = {TTFT_MS}"
