"""Backpressure: what the server does when a client reads slower than the model writes.

Strategy
--------
TCP already has the mechanism (RFC 9293 §3.8.6, flow control): the receiver
advertises a window of bytes it has room for, and the sender may not have
more than that in flight.  A client that stops reading fills its receive
buffer, its window closes, our kernel's send buffer fills behind it, and then
the server's next write *blocks*: an SSE body chunk or a WebSocket message
simply does not return.  Nothing is lost and nothing is dropped; the question
is only what the model does meanwhile.  That is a policy, chosen per server
(``refimpl serve --backpressure``) and per request (the top-level body field
``"backpressure"``, also in the WebSocket ``chat`` message); lesson 10
compares the three on one workload.

``pause`` (the default)
    The model waits for the writer.  The writers *pull* (``engine.py``): they
    ask for tokens only when their previous write is done, so a blocked write
    means no pull and the model does not step.  Memory stays flat however
    long the client dawdles, and no GPU time is spent ahead of a reader who
    may never catch up.  The cost: the model's slot is held while it waits.
``coalesce``
    The model keeps going, up to ``--coalesce-max-tokens`` ahead of the
    client; when the socket frees, everything pending leaves as *one* chunk
    (one ``chat.completion.chunk``, one ``token`` message).  The text the
    client finally has is the same; only the chunking differs.  The model
    finishes (and frees its slot) sooner, at the price of that bounded
    buffer.  It needs a task that produces while the writer is blocked (the
    one hand-off per chunk the pull design otherwise avoids), started in a
    nursery that outlives the response's body generator.
``disconnect``
    Like ``pause``, but a client that takes fewer than
    ``--min-tokens-per-s`` tokens per second over ``--slow-window``
    seconds, while the writer spent at least half of that window blocked
    on it, is ended: error code ``slow_consumer`` (sent if the socket still
    takes it), trace ``cancelled(slow_consumer)``, then the stream ends (the
    WebSocket is closed with 1008).  Only time blocked on the client counts,
    so a slow *model* never gets its client disconnected, however few tokens
    per second it makes; and a reader whose writes unblock now and then
    (the kernel wakes the writer whenever half its buffer is free) is judged
    over the whole window, not pause by pause.

A client that reads *nothing* never lets its write return, so no policy can
act on it from here; the watchdog's stall guard drops it after
``--stall-timeout`` seconds whatever the policy (``hypercorn_patches.py``).

The trace.  ``paused`` means the model stood still because of the client:
under ``pause`` and ``disconnect``, a write that took at least
:data:`PAUSE_AFTER` seconds while the model had tokens waiting (detail
``write_blocked``); under ``coalesce``, the buffer reached its cap
(``buffer_full``).  ``resumed`` comes when no write has blocked for
:data:`PAUSE_AFTER` seconds (or when the writer takes the buffer), so a
client that reads steadily but too slowly, whose writes block again and
again, is one long pause, not hundreds.  A write's length is known only
when it returns, so both are stamped with the moment they happened, after
the fact; a write still blocked when the generation ends (a stalled client
dropped) is noted then.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Protocol

import trio

from ..backend import ModelError
from ..engine import FINISHED, SILENT, Generation, Idle
from ..protocols.chat_request import POLICIES

__all__ = ["PAUSE_AFTER", "POLICIES", "Coalesce", "Disconnect", "Flow", "Pause", "SlowConsumer", "flow"]

if TYPE_CHECKING:
    from ..config import Config

#: A write that took this long (seconds) blocked on the socket: a pause.  A
#: write that does not block takes microseconds; a busy scheduler's hiccup
#: is not backpressure.
PAUSE_AFTER = 0.1


class SlowConsumer(ModelError):
    """The ``disconnect`` policy ended the stream: the client is too slow."""

    def __init__(self, rate: float, window: float) -> None:
        super().__init__(
            "slow_consumer",
            f"The client read fewer than {rate:g} tokens/s for {window:g} s while the model"
            " waited for it; the stream was ended (backpressure policy 'disconnect').",
        )


class Flow(Protocol):
    """What a writer pulls through: ``Generation.pull``'s contract."""

    async def pull(self, limit: int, timeout: float = math.inf) -> list[str] | Idle: ...

    def close(self) -> None: ...

    def held_back(self) -> bool: ...


# region: flow
def flow(gen: Generation, policy: str | None, config: Config, nursery: trio.Nursery) -> Flow:
    """The writer's side of ``gen`` under ``policy`` (None: the server's
    ``--backpressure``).  The writer calls ``pull()`` in its loop and
    ``close()`` in its ``finally``; ``nursery`` must outlive the writer."""
    policy = policy or config.backpressure
    if policy == "coalesce":
        made: Flow = Coalesce(gen, config.coalesce_max_tokens, nursery)
    elif policy == "disconnect":
        made = Disconnect(gen, config.min_tokens_per_s, config.slow_window)
    else:
        made = Pause(gen)
    # The paused-streams gauge asks each flow at scrape time (metrics.py);
    # close() takes it out.
    gen.metrics.flows.add(made)
    return made


# endregion: flow


# region: pause
class Pause:
    """The model steps only when the writer pulls; this notes the pauses."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.sent = 0  # tokens handed to the socket (written once we are back)
        self.blocked = 0.0  # seconds spent in writes that blocked
        self.paused_since: float | None = None  # when the current pause began
        self._left_at: float | None = None  # when the writer last went off to write
        self._blocked_until = 0.0  # when the last blocked write returned
        self._blocked_tokens = 0  # the model's count then
        self._returned_blocked: float | None = None  # (see pull)
        gen.on_end = self._ending

    async def pull(self, limit: int, timeout: float = math.inf) -> list[str] | Idle:
        back, left = trio.current_time(), self._left_at
        blocked = left is not None and back - left >= PAUSE_AFTER  # that write waited
        if blocked:
            self.blocked += back - left
        self._check(back)  # (ending it here notes the pause first: _ending)
        self._left_at = None
        # A write that blocked and then returned because the connection
        # closed: the pull below is cancelled, and _ending must still see it.
        self._returned_blocked = left if blocked else None
        before = self.gen.completion_tokens
        step = await self.gen.pull(limit, timeout)
        self._returned_blocked = None
        if blocked and self.gen.behind:
            # A write blocked, and the model had tokens for us: it stood still.
            if self.paused_since is None:
                self.paused_since = left
                self.gen.trace.record("paused", before, "write_blocked", at=left)
            self._blocked_until, self._blocked_tokens = back, before
        elif self.paused_since is not None and back - self._blocked_until >= PAUSE_AFTER:
            # No write has blocked for a while: the client keeps up again.
            self.paused_since = None
            self.gen.trace.record("resumed", self._blocked_tokens, at=self._blocked_until)
        if isinstance(step, list):
            self.sent += len(step)
        self._left_at = trio.current_time()
        return step

    def _ending(self) -> None:
        """The generation ends while we are away: a write still blocked (or
        one that blocked and returned only because the client left)."""
        left = self._left_at if self._left_at is not None else self._returned_blocked
        if self.paused_since is None and left is not None and trio.current_time() - left >= PAUSE_AFTER:
            self.gen.trace.record("paused", self.gen.completion_tokens, "write_blocked", at=left)

    def close(self) -> None:
        self.gen.on_end = None
        self.gen.metrics.flows.discard(self)

    def held_back(self) -> bool:
        """Right now, a write has been blocked on the client for at least
        PAUSE_AFTER (the paused-streams gauge; the trace says so only once
        the write returns)."""
        return self._left_at is not None and trio.current_time() - self._left_at >= PAUSE_AFTER

    def _check(self, back: float) -> None:
        """What Disconnect adds."""


# endregion: pause


# region: disconnect
class Disconnect(Pause):
    """``pause``, and a client that stays too slow for too long is ended."""

    #: The share of the window the writer must have spent blocked for the
    #: client, not the model, to be the one holding the stream back.
    BLOCKED_SHARE = 0.5

    def __init__(self, gen: Generation, min_rate: float, window: float) -> None:
        super().__init__(gen)
        self.min_rate, self.window = min_rate, window
        # (time, tokens sent, seconds blocked), a few per window.
        self._samples: deque[tuple[float, int, float]] = deque()

    def _check(self, back: float) -> None:
        """Back from a write: over the last window, was the writer blocked
        most of the time, and did the client take too few tokens?"""
        samples = self._samples
        if not samples or back - samples[-1][0] >= self.window / 8:
            samples.append((back, self.sent, self.blocked))
        while len(samples) > 1 and samples[1][0] <= back - self.window:
            samples.popleft()
        t0, sent0, blocked0 = samples[0]
        span = back - t0
        if span < self.window or (self.blocked - blocked0) < self.BLOCKED_SHARE * span:
            return
        if (self.sent - sent0) / span < self.min_rate:
            self.gen.cancel("slow_consumer")  # the trace: cancelled(slow_consumer)
            raise SlowConsumer(self.min_rate, self.window)


# endregion: disconnect


# region: coalesce
class Coalesce:
    """A producer task runs the model up to ``cap`` tokens ahead of the
    writer; the writer takes everything pending as one chunk."""

    def __init__(self, gen: Generation, cap: int, nursery: trio.Nursery) -> None:
        self.gen = gen
        self.cap = cap
        self.most_pending = 0  # the high-water mark (lesson 10 reports it)
        self._pending: list[str] = []
        self._outcome: Idle | BaseException | None = None  # FINISHED or what the model raised
        self._more = trio.Event()  # tokens or the outcome arrived
        self._room = trio.Event()  # the writer took the pending tokens
        self._scope = trio.CancelScope()
        nursery.start_soon(self._produce)

    async def _produce(self) -> None:
        gen = self.gen
        with self._scope:
            try:
                while True:
                    if (room := self.cap - len(self._pending)) <= 0:
                        await self._full()
                        continue
                    step = await gen.pull(room)
                    if step is FINISHED:
                        self._outcome = FINISHED
                        break
                    self._pending += step
                    self.most_pending = max(self.most_pending, len(self._pending))
                    self._more.set()
            except Exception as exc:  # a model failure, a cancel, a bug: the writer's to handle
                self._outcome = exc
            finally:
                self._more.set()

    async def _full(self) -> None:
        """At the cap: the model pauses until the writer takes the tokens."""
        self.gen.trace.record("paused", self.gen.completion_tokens, "buffer_full")
        self._room = trio.Event()
        await self._room.wait()
        self.gen.trace.record("resumed", self.gen.completion_tokens)

    async def pull(self, limit: int, timeout: float = math.inf) -> list[str] | Idle:
        if not self._pending and self._outcome is None:
            self._more = trio.Event()
            with trio.move_on_after(timeout):
                await self._more.wait()
        else:
            await trio.lowlevel.checkpoint()  # where a cancel reaches the writer
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._room.set()
            return [text]
        if self._outcome is None:
            return SILENT
        if self._outcome is FINISHED:
            return FINISHED
        raise self._outcome

    def close(self) -> None:
        self._scope.cancel()
        self.gen.metrics.flows.discard(self)

    def held_back(self) -> bool:
        """The buffer is at its cap: the model waits for the client."""
        return len(self._pending) >= self.cap


# endregion: coalesce
