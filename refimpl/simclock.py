"""One timer for many simulated streams (lesson 13, "where a token's time goes").

Strategy
--------
``trio.sleep_until`` is a cancel scope with a deadline: every wake-up is a
*cancellation*, which raises ``Cancelled`` inside the sleeper and catches it
again in the scope.  That is cheap enough once, but the simulated model
sleeps once per token per stream; at 100 streams × 50 tokens/s it was the
largest single cost in the server (lesson 13 measured ~21 µs per wake-up,
against ~8 µs for the same wake-up done the way below).

:class:`SharedClock` keeps the sleepers in a heap ordered by deadline and
runs *one* timer task in the app's lifespan nursery.  That task sleeps until
the earliest deadline, then wakes every sleeper that is due with
``trio.lowlevel.reschedule`` (a plain hand-over, no exception), and exits
when nobody is waiting; the next sleeper starts it again.  A sleeper parks
with ``trio.lowlevel.wait_task_rescheduled``; if it is cancelled while
parked (the heartbeat timeout, a client leaving) its abort callback marks its
heap entry dead and trio raises ``Cancelled`` as usual, so sleeping is as
cancel-safe as ``trio.sleep_until``: call it again with the same deadline.

Before :meth:`attach` (unit tests that build a model without an app) it is
simply ``trio.sleep_until``.  Only the simulator needs this: a real model
behind ``upstream`` waits on a socket, not on a timer.
"""

from __future__ import annotations

import heapq
import itertools

import trio


class SharedClock:
    def __init__(self) -> None:
        self._heap: list[list] = []  # [deadline, tie-breaker, task or None]
        self._order = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._running = False

    def attach(self, nursery: trio.Nursery) -> None:
        """Run the timer task in ``nursery`` (the app's lifespan nursery)."""
        self._nursery = nursery

    # region: shared-clock
    async def sleep_until(self, deadline: float) -> None:
        if self._nursery is None or deadline <= trio.current_time():
            return await trio.sleep_until(deadline)  # (a due deadline: a checkpoint)
        if not self._running:
            try:
                self._nursery.start_soon(self._run)
            except RuntimeError:  # the app's nursery has closed: shutting down
                self._nursery = None
                return await trio.sleep_until(deadline)
            self._running = True
        entry = [deadline, next(self._order), trio.lowlevel.current_task()]
        heapq.heappush(self._heap, entry)
        if self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline  # we are now the earliest

        def abort(_: object) -> trio.lowlevel.Abort:
            entry[2] = None  # cancelled while parked: the timer skips us
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _run(self) -> None:
        try:
            while self._heap:
                with trio.CancelScope(deadline=self._heap[0][0]) as self._timer:
                    await trio.sleep_forever()
                now = trio.current_time()
                while self._heap and self._heap[0][0] <= now:
                    task = heapq.heappop(self._heap)[2]
                    if task is not None:
                        trio.lowlevel.reschedule(task)
        finally:
            # Normally the heap is empty here.  If the app is shutting down
            # and cancelled us, wake everyone rather than strand them.
            self._running, self._timer = False, None
            while self._heap:
                task = heapq.heappop(self._heap)[2]
                if task is not None:
                    trio.lowlevel.reschedule(task)

    # endregion: shared-clock

    @property
    def sleepers(self) -> int:
        """Sleepers parked now (dead entries not counted)."""
        return sum(1 for entry in self._heap if entry[2] is not None)
