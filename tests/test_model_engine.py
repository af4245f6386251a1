"""The simulated model and the engine, on trio's virtual clock.

``MockClock`` makes the model's timing exact: TTFT and ITL are asserted to
the microsecond because no real time passes (STYLE: no sleeps, no timing
asserts against the wall clock).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from refimpl.engine import FINISHED, Engine, GenerationCancelled
from refimpl.metrics import Metrics
from refimpl.model import (
    ModelError,
    ModelRequest,
    Simulate,
    SimulatedModel,
    count_tokens,
)


def request(prompt="hello there", **sim) -> ModelRequest:
    return ModelRequest(messages=(("user", prompt),), simulate=Simulate(**sim))


def engine() -> Engine:
    return Engine(SimulatedModel(), Metrics())


async def collect(stream):
    out = []
    while (token := await stream.next()) is not None:
        out.append((trio.current_time(), token))
    return out


async def test_timing_is_exact_on_the_virtual_clock(autojump_clock):
    start = trio.current_time()
    out = await collect(SimulatedModel().start(request(ttft_ms=250, itl_ms=20, tokens=5)))
    times = [round((t - start) * 1000, 6) for t, _ in out]
    assert times == [250, 270, 290, 310, 330]


async def test_text_is_deterministic_and_seeded():
    a = [t for _, t in await collect(SimulatedModel().start(request(ttft_ms=0, itl_ms=0, seed=1)))]
    b = [t for _, t in await collect(SimulatedModel().start(request(ttft_ms=0, itl_ms=0, seed=1)))]
    c = [t for _, t in await collect(SimulatedModel().start(request(ttft_ms=0, itl_ms=0, seed=2)))]
    assert a == b != c
    assert len(a) == 64 and "".join(a)[0].isupper()


async def test_prompt_tokens_counted():
    assert count_tokens("Hello, world!") == 4
    stream = SimulatedModel().start(request("one two three"))
    assert stream.prompt_tokens == 3


async def test_fail_after_tokens_raises_model_error():
    stream = SimulatedModel().start(request(ttft_ms=0, itl_ms=0, fail_after_tokens=2, fail_with="x"))
    assert await stream.next() and await stream.next()
    with pytest.raises(ModelError) as info:
        await stream.next()
    assert info.value.code == "x"


async def test_next_is_cancel_safe(autojump_clock):
    """Cancelling a wait (as the heartbeat timer does) loses no token and does
    not restart the delay: the token still comes at its original deadline."""
    stream = SimulatedModel().start(request(ttft_ms=1000, itl_ms=0, tokens=3))
    start = trio.current_time()
    for _ in range(3):
        with trio.move_on_after(0.3):
            await stream.next()
    assert stream.completion_tokens == 0
    first = await stream.next()
    assert trio.current_time() - start == pytest.approx(1.0)
    assert first is not None and stream.completion_tokens == 1


async def test_slow_reader_pauses_the_model(autojump_clock):
    """A token is due itl after the previous one was *taken*: a reader that
    waits 1 s between reads gets tokens 1 s apart, not a backlog."""
    stream = SimulatedModel().start(request(ttft_ms=0, itl_ms=10, tokens=3))
    await stream.next()
    await trio.sleep(1)
    assert stream.poll() is not None  # one token was due; only one
    assert stream.poll() is None


async def test_engine_wait_batches_ready_tokens():
    """When the model is ahead of the writer, one wait() takes what is ready,
    up to the limit; at the end it returns FINISHED, never an empty list."""
    gen = engine().start(request(ttft_ms=0, itl_ms=0, tokens=10), "test")
    assert [len(await gen.wait(limit=4)) for _ in range(3)] == [4, 4, 2]
    assert await gen.wait(limit=4) is FINISHED
    assert gen.trace.names() == ["accepted", "first_token", "done"]


async def test_engine_trace_done_and_usage(autojump_clock):
    eng = engine()
    gen = eng.start(request(ttft_ms=100, itl_ms=10, tokens=3), "test")
    tokens = []
    while (batch := await gen.wait()) is not FINISHED:
        tokens += batch
    assert len(tokens) == 3 and gen.usage()["completion_tokens"] == 3
    assert gen.trace.names() == ["accepted", "first_token", "done"]
    assert gen.trace.first("first_token").at - gen.trace.first("accepted").at == pytest.approx(0.1)
    assert gen.ended.is_set() and not eng.active


async def test_engine_cancel_stops_a_waiting_generation(autojump_clock):
    eng = engine()
    gen = eng.start(request(ttft_ms=60_000), "test")

    async def cancel_later() -> None:
        await trio.sleep(0.5)
        gen.cancel("client_cancel")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_later)
        with pytest.raises(GenerationCancelled):
            await gen.wait()
    assert trio.current_time() - gen.trace.first("accepted").at == pytest.approx(0.5)
    assert gen.trace.names() == ["accepted", "cancelled"]
    assert gen.trace.events[-1].detail == "client_cancel"
    assert not eng.active and eng.metrics.active._value.get() == 0


async def test_error_after_ready_tokens_loses_nothing():
    gen = engine().start(request(ttft_ms=0, itl_ms=0, fail_after_tokens=5, fail_with="x"), "test")
    assert len(gen.ready()) == 5  # the five made before the failure
    with pytest.raises(ModelError):
        gen.ready()
    assert gen.trace.names()[-1] == "error"


async def test_cancelled_generation_hands_out_no_more_tokens():
    """After cancel() the model is stopped for every way of pulling from it:
    ready() as much as wait(), so the trace's count never grows past the
    cancelled event."""
    gen = engine().start(request(ttft_ms=0, itl_ms=0, tokens=100), "test")
    assert len(gen.ready(10)) == 10
    gen.cancel("shutdown")
    with pytest.raises(GenerationCancelled):
        gen.ready()
    with pytest.raises(GenerationCancelled):
        await gen.wait()
    assert gen.completion_tokens == gen.trace.events[-1].tokens == 10
