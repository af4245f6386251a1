"""The check of exercise 13: your numbers against the model's clock.

A summary worked out by hand, then two live streams on trio's virtual clock:
a paced model (a token every 20 ms, one per read) and a model that is ahead
of the socket (``itl_ms`` 0: every token due at once, written up to 64 per
write).
"""

from __future__ import annotations

import trio
from conftest import chat_body
from pytest import approx


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def shown(s) -> str:
    return (
        f"TTFT {ms(s.ttft)} ms, ITL p50 {ms(s.itl_p50)} p99 {ms(s.itl_p99)} ms, "
        f"e2e {ms(s.e2e)} ms, {s.tokens} tokens in {s.reads} reads"
    )


def test_summarize_by_hand(exercise):
    # Three reads: 1 token at 0.30 s, 2 tokens at 0.32 s, 1 token at 0.36 s.
    got = exercise.summarize(0.0, [(0.30, 1), (0.32, 2), (0.36, 1)])
    # Token stamps 0.30, 0.32, 0.32, 0.36: gaps 0.02, 0, 0.04.
    tokens, reads = got.tokens, got.reads
    assert (tokens, reads) == (4, 3), "4 tokens came in 3 reads"
    assert (got.ttft, got.e2e) == approx((0.30, 0.36))
    assert got.itl_p50 == approx(0.02), "the median of the gaps 0.02, 0 and 0.04"
    assert got.itl_p99 == approx(0.0396)


async def test_a_paced_model(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    with trio.fail_after(10):
        got = await exercise.measure(
            client, server.url, chat_body(simulate={"ttft_ms": 300, "itl_ms": 20, "tokens": 20})
        )
    observe("ttft 300 ms, itl 20 ms, 20 tokens", shown(got))
    assert (got.tokens, got.reads) == (20, 20)
    assert (got.ttft, got.itl_p50, got.itl_p99, got.e2e) == approx((0.3, 0.02, 0.02, 0.3 + 19 * 0.02))


async def test_a_model_ahead_of_the_socket(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()
    with trio.fail_after(10):
        got = await exercise.measure(
            client, server.url, chat_body(simulate={"ttft_ms": 0, "itl_ms": 0, "tokens": 500})
        )
    observe("itl 0 ms, 500 tokens", shown(got))
    tokens, reads = got.tokens, got.reads
    assert tokens == 500, f"you counted {tokens} tokens in {reads} reads; the server sent 500"
    assert got.reads < 500 and got.itl_p50 == 0
