"""The simulated model's shared clock, on trio's virtual clock.

Each sleeper must wake at its deadline rounded up to the clock's tick (never
earlier, at most a tick later: exactly at it with ``tick=0``), in deadline
order, however the deadlines arrive, and sleepers due within one tick wake
together; a sleeper cancelled while
parked must never be woken and must be able to sleep again; and the timer
task must go away when nobody is waiting.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from refimpl.simclock import SharedClock


async def test_sleepers_wake_exactly_at_their_deadlines(autojump_clock):
    woke: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        clock = SharedClock(tick=0)
        clock.attach(nursery)
        start = trio.current_time()

        async def sleeper(name: str, delay: float) -> None:
            await clock.sleep_until(start + delay)
            woke.append((name, trio.current_time() - start))

        # Arrive latest-first, so each new one is earlier than the timer's.
        for name, delay in [("c", 3.0), ("b", 2.0), ("a", 1.0), ("a2", 1.0)]:
            nursery.start_soon(sleeper, name, delay)
    # (trio runs tasks woken together in no fixed order: "a" and "a2" tie)
    assert sorted(n for n, _ in woke[:2]) == ["a", "a2"] and [n for n, _ in woke[2:]] == ["b", "c"]
    assert dict(woke) == pytest.approx({"a": 1.0, "a2": 1.0, "b": 2.0, "c": 3.0})
    assert clock.sleepers == 0 and not clock._running  # the timer task is gone


async def test_deadlines_round_up_to_the_tick_and_wake_together(autojump_clock):
    """Timer slack: five deadlines in two ticks are two wake-ups, none early."""
    tick = 0.010
    woke: dict[float, float] = {}
    async with trio.open_nursery() as nursery:
        clock = SharedClock(tick=tick)
        clock.attach(nursery)
        base = (int(trio.current_time() / tick) + 1) * tick  # on a tick

        async def sleeper(offset: float) -> None:
            await clock.sleep_until(base + offset)
            woke[offset] = trio.current_time() - base

        for offset in (0.001, 0.004, 0.0099, 0.0101, 0.019):
            nursery.start_soon(sleeper, offset)
    assert woke == pytest.approx({0.001: 0.01, 0.004: 0.01, 0.0099: 0.01, 0.0101: 0.02, 0.019: 0.02})
    assert clock.wakeups == 2


async def test_cancelled_sleeper_is_skipped_and_can_sleep_again(autojump_clock):
    async with trio.open_nursery() as nursery:
        clock = SharedClock()
        clock.attach(nursery)
        start = trio.current_time()
        with trio.move_on_after(0.5) as timer:  # the heartbeat's job
            await clock.sleep_until(start + 2.0)
        assert timer.cancelled_caught and clock.sleepers == 0
        await clock.sleep_until(start + 2.0)  # same deadline, resumed
        assert trio.current_time() - start == pytest.approx(2.0)


async def test_unattached_clock_is_plain_sleep_until(autojump_clock):
    clock = SharedClock()
    start = trio.current_time()
    await clock.sleep_until(start + 1.5)
    assert trio.current_time() - start == pytest.approx(1.5)
    assert clock.sleepers == 0 and not clock._running


async def test_shutdown_wakes_parked_sleepers(autojump_clock):
    """If the app cancels the timer task, parked streams are woken, not stranded."""
    woke = trio.Event()
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as lifespan:
            clock = SharedClock()
            clock.attach(lifespan)

            async def sleeper() -> None:
                await clock.sleep_until(trio.current_time() + 3600)
                woke.set()

            outer.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            lifespan.cancel_scope.cancel()
        with trio.fail_after(1):
            await woke.wait()


async def test_after_the_app_nursery_closed_it_falls_back(autojump_clock):
    """A stream still sleeping while the app shuts down must not crash on a
    closed nursery: it sleeps the plain way instead."""
    async with trio.open_nursery() as lifespan:
        clock = SharedClock()
        clock.attach(lifespan)
    start = trio.current_time()
    await clock.sleep_until(start + 1.0)
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_interrupt_after_the_timer_woke_the_sleeper_is_a_no_op(autojump_clock):
    """The timer has rescheduled a sleeper that has not run yet, and a
    cancel() comes in between: the sleeper must not be woken twice (trio
    forbids it); it simply gets its token, and the engine sees the cancel."""
    async with trio.open_nursery() as nursery:
        clock = SharedClock(tick=0)
        clock.attach(nursery)
        sleeper = None
        woke = trio.Event()

        async def sleep(deadline: float) -> None:
            nonlocal sleeper
            sleeper = trio.lowlevel.current_task()
            await clock.sleep_until(deadline)
            woke.set()

        async def interrupt_right_after_the_timer(deadline: float) -> None:
            # Due with the sleeper and behind it in the heap: the timer has
            # rescheduled the sleeper when it wakes us, whichever runs first.
            await clock.sleep_until(deadline)
            assert clock.interrupt(sleeper) is False

        deadline = trio.current_time() + 1.0
        nursery.start_soon(sleep, deadline)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(interrupt_right_after_the_timer, deadline)
    assert woke.is_set()
