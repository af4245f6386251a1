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

Timer slack.  Each wake-up of the timer is still a trip through trio's
deadline machinery and the run loop, and with hundreds of streams the
deadlines are all different: at 200 streams × 50 tokens/s the timer would
wake 10,000 times a second, once per token.  So, like the kernel's own timer
slack (``prctl(PR_SET_TIMERSLACK)``), the clock rounds every deadline *up*
to its ``tick`` (1 ms by default): sleepers due within the same millisecond
wake together, at most 1,000 wake-ups a second however many streams there
are, and a token is never early, at most one tick late.  ``tick=0`` turns
the rounding off.

No cancel scope per token.  A writer waiting for its stream's next token
used to wrap the wait in a cancel scope (for the heartbeat's silence, the
generation's deadline, and ``cancel()``): entering and leaving one, with its
deadline, cost as much as the rest of the wait.  When the next token is due
before the silence and the deadline would end the wait anyway, the engine
waits without a scope, and a ``cancel()`` meanwhile wakes the sleeper through
:meth:`interrupt`, which hands it :class:`~refimpl.backend.Interrupted`
instead of its token.

Before :meth:`attach` (unit tests that build a model without an app) it is
simply ``trio.sleep_until``.  Only the simulator needs this: a real model
behind ``upstream`` waits on a socket, not on a timer.
"""

from __future__ import annotations

import heapq
import itertools
import math

import outcome
import trio

from .backend import Interrupted

#: How far a deadline may be rounded up (seconds): see "Timer slack" above.
TICK = 0.001


class SharedClock:
    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._heap: list[list] = []  # [deadline, tie-breaker, task or None]
        self._parked: dict[trio.lowlevel.Task, list] = {}  # task -> its heap entry
        self._order = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._running = False
        self.wakeups = 0  # times the timer woke (how well the tick batches them)

    def attach(self, nursery: trio.Nursery) -> None:
        """Run the timer task in ``nursery`` (the app's lifespan nursery)."""
        self._nursery = nursery

    # region: shared-clock
    async def sleep_until(self, deadline: float) -> None:
        if self.tick:  # up to the next tick; 1e-9: a float a hair over a tick is on it
            deadline = math.ceil(deadline / self.tick - 1e-9) * self.tick
        if deadline <= trio.current_time():
            # Due already (the writer came back late): what trio.sleep_until
            # would do, a checkpoint, without its cancel scope (4 us, not 19).
            return await trio.lowlevel.checkpoint()
        if self._nursery is None:
            return await trio.sleep_until(deadline)
        if not self._running:
            try:
                self._nursery.start_soon(self._run)
            except RuntimeError:  # the app's nursery has closed: shutting down
                self._nursery = None
                return await trio.sleep_until(deadline)
            self._running = True
        task = trio.lowlevel.current_task()
        entry = [deadline, next(self._order), task]
        heapq.heappush(self._heap, entry)
        self._parked[task] = entry
        if self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline  # we are now the earliest

        def abort(_: object) -> trio.lowlevel.Abort:
            entry[2] = None  # cancelled while parked: the timer skips us
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            del self._parked[task]

    def interrupt(self, task: trio.lowlevel.Task) -> bool:
        """Wake ``task`` now with :class:`Interrupted` if it is parked here;
        whether it was.  Its heap entry goes dead, as when it is cancelled."""
        entry = self._parked.get(task)
        if entry is None or entry[2] is None:
            return False
        entry[2] = None
        trio.lowlevel.reschedule(task, outcome.Error(Interrupted()))
        return True

    @property
    def attached(self) -> bool:
        """Whether sleepers park here (after :meth:`attach`, before shutdown)."""
        return self._nursery is not None

    async def _run(self) -> None:
        try:
            while self._heap:
                with trio.CancelScope(deadline=self._heap[0][0]) as self._timer:
                    await trio.sleep_forever()
                self.wakeups += 1
                now = trio.current_time()
                while self._heap and self._heap[0][0] <= now:
                    self._wake(heapq.heappop(self._heap))
        finally:
            # Normally the heap is empty here.  If the app is shutting down
            # and cancelled us, wake everyone rather than strand them.
            self._running, self._timer = False, None
            while self._heap:
                self._wake(heapq.heappop(self._heap))

    @staticmethod
    def _wake(entry: list) -> None:
        task, entry[2] = entry[2], None  # woken: interrupt() must not wake it twice
        if task is not None:
            trio.lowlevel.reschedule(task)

    # endregion: shared-clock

    @property
    def sleepers(self) -> int:
        """Sleepers parked now (dead entries not counted)."""
        return sum(1 for entry in self._heap if entry[2] is not None)
