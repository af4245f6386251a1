"""Resumable streams: ``id:``, ``Last-Event-ID`` and a replay log (lesson 11).

Strategy
--------
SSE has resumption built in (WHATWG HTML §9.2).  An event may carry an
``id:`` field; the reader keeps the last one it saw, and when the connection
drops, ``EventSource`` reconnects by itself, sending that id back in a
``Last-Event-ID`` header.  A ``retry:`` field tells it how many milliseconds
to wait before reconnecting, and any answer other than a 200 event stream
(a 204, say) makes it stop for good.  The format brings the mechanism; the
server must bring the memory: something has to keep the events a client may
ask for again.

So a request with ``"resumable": true`` is not written by the task that
answers it, as ``sse_chat.py``'s pull loop writes an ordinary stream:

* :func:`produce`, a task in the app's nursery, runs the generation to its
  end and appends each event, numbered 1, 2, 3, ... and framed once with its
  ``id:``, to the generation's :class:`ReplayLog`;
* every reader -- the POST that started it, and each ``GET
  /v1/chat/completions/{id}/events`` after a drop -- follows the log from the
  event after the last one it saw (:func:`follow`).  Reading a list onwards
  from an index cannot skip or repeat an event, also when a resume races the
  end: the ending is just the log's last entry (``[DONE]`` or the error
  event), and the log outlives the generation by ``--resume-window``.

What it costs: the model no longer waits for its reader (lesson 10's
backpressure is traded for the log).  A slow reader is just behind in the
log, and the log is bounded: ``--resume-max-events`` per generation (past it
the generation ends with ``resume_log_full``), ``--resume-max-generations``
logs per process (:class:`Registry`).  A generation nobody reads runs on for
``--resume-grace`` seconds, then is cancelled (``client_disconnect``): a
client that never comes back must not keep the model busy.  ``POST
.../{id}/cancel`` stops it at once (``client_cancel``).

Where the log also lives is the store's business.  :class:`Store` here keeps
it in this process's memory; ``redis_store.py`` adds Redis Streams so that a
client can resume on any process behind a load balancer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..backend import ModelError
from ..engine import FINISHED, SILENT, Generation, GenerationCancelled
from ..jsonwire import dumps
from ..sse import encode
from . import errors, heartbeat
from .errors import APIError

if TYPE_CHECKING:
    from ..config import Config
    from ..protocols.sse_chat import ChunkFramer

#: Sent first on a resume: EventSource waits 1 s, not its default 3 s, before
#: it reconnects after the next drop.
RETRY = b"retry: 1000\n\n"
#: Most events in one write when a reader catches up on a long replay.
REPLAY_BATCH = 256


# region: replay-log
@dataclass(slots=True)
class Entry:
    seq: int  # 1, 2, 3, ...: the event's id
    wire: bytes  # the whole SSE event, its "id:" line included
    last: bool = False  # [DONE] or the error event: nothing follows


class ReplayLog:
    """One resumable generation's events, in order, for any number of readers."""

    def __init__(self, gen_id: str, gen: Generation | None = None) -> None:
        self.gen_id = gen_id
        self.gen = gen  # None: a copy of a generation running in another process
        self.entries: list[Entry] = []  # entries[i].seq == i + 1
        # A failure of the log itself (the store failed, the producing process
        # died): an error event with no id, so it is never "seen" for good.
        self.failure: bytes | None = None
        self.readers = 0
        self.left_at: float | None = trio.current_time()  # None: someone reads now
        self.ended_at: float | None = None
        self._changed = trio.Event()

    @property
    def seq(self) -> int:
        """The id of the newest event (0: none yet)."""
        return len(self.entries)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def append(self, events: list[tuple[str | None, str]], last: bool = False) -> list[Entry]:
        """Number and frame ``(event type, data)`` pairs, then add them."""
        n = self.seq
        new = [
            Entry(n + i, encode(data, event=kind, id=str(n + i))) for i, (kind, data) in enumerate(events, 1)
        ]
        new[-1].last = last
        self.extend(new)
        return new

    def extend(self, entries: list[Entry]) -> None:
        """Add entries numbered already (a copy of another process's log)."""
        self.entries += entries
        if entries and entries[-1].last:
            self.ended_at = trio.current_time()
        self._wake()

    def fail(self, err: ModelError) -> None:
        if not self.ended:
            self.failure = errors.sse_error_event(err)
            self.ended_at = trio.current_time()
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self, timeout: float) -> bool:
        """Wait for new entries (or the end); False if ``timeout`` passed first."""
        with trio.move_on_after(timeout):
            await self._changed.wait()
            return True
        return False

    def attach(self, after: int) -> None:
        self.readers += 1
        self.left_at = None
        if self.gen is not None:
            self.gen.trace.record("attached", self.gen.completion_tokens, str(after))

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0:
            self.left_at = trio.current_time()
        if self.gen is not None:
            self.gen.trace.record("detached", self.gen.completion_tokens)


# endregion: replay-log


# region: follow
async def follow(log: ReplayLog, after: int, silence: float, first: bytes = b"") -> AsyncIterator[bytes]:
    """A reader: the events after id ``after``, then the live ones, to the end.

    The response body of the POST that started the generation (``after``
    0) and of every resume.  ``: ping`` after ``silence`` seconds with
    nothing new (lesson 08).  Leaving early only detaches: the generation
    runs on (:func:`produce`'s grace)."""
    log.attach(after)
    try:
        if first:
            yield first
        while True:
            if entries := log.entries[after : after + REPLAY_BATCH]:
                after = entries[-1].seq
                yield b"".join([e.wire for e in entries])
                if entries[-1].last:
                    return
            elif log.failure is not None:
                yield log.failure
                return
            elif log.ended:  # it ended before the id this reader resumed after
                return
            elif not await log.changed(silence):
                yield heartbeat.sse_heartbeat(log.gen) if log.gen is not None else heartbeat.SSE_PING
    finally:
        log.detach()


# endregion: follow


# region: produce
async def produce(gen: Generation, log: ReplayLog, framer: ChunkFramer, store: Store, config: Config) -> None:
    """The generation's one writer: from the model into the log, to the end,
    whoever reads.  Runs in the app's nursery."""
    tick = store.period
    # The ending takes 2 events (the final chunk, [DONE]), 3 with usage.
    room = config.resume_max_events - (3 if framer.include_usage else 2)
    next_look = trio.current_time() + tick

    async def put(events: list[tuple[str | None, str]], last: bool = False) -> None:
        await store.appended(log, log.append(events, last))

    try:
        try:
            await put([(None, framer.role_json())])
            while (step := await gen.pull(config.batch_tokens, timeout=tick)) is not FINISHED:
                if step is not SILENT:
                    fits = step[: room - log.seq]
                    if fits:
                        await put([(None, framer.content_json(t)) for t in fits])
                    if len(fits) < len(step):  # a token that cannot be logged: the end
                        raise _ended(gen, log_full(config.resume_max_events))
                if trio.current_time() >= next_look:
                    next_look = trio.current_time() + tick
                    await look_for_readers(gen, log, store, config.resume_grace)
            ending = [(None, data) for data in framer.end_json()]
        except store.Unavailable as err:  # the log cannot be written: nor can the stream
            log.fail(_ended(gen, err))
            return
        except ModelError as err:  # the model's (lesson 07), or the log is full
            ending = [error_event(err)]
        except GenerationCancelled as cancel:  # POST .../cancel, the grace, shutdown
            ending = [error_event(errors.cancelled_error(cancel.reason))]
        except Exception as bug:
            ending = [error_event(gen.fail(bug))]
        await put(ending, last=True)
    except store.Unavailable as err:  # the ending could not be written
        log.fail(err)
    finally:
        if not gen.finished:  # the app's nursery was cancelled under us
            gen.cancel("shutdown")


def error_event(err: ModelError) -> tuple[str, str]:
    return ("error", dumps(errors.model_failure_body(err)))


def _ended(gen: Generation, err: ModelError) -> ModelError:
    gen.end_with(err)
    return err


def log_full(limit: int) -> ModelError:
    return ModelError(
        "resume_log_full",
        f"This resumable stream needs more than the server's limit of {limit} events"
        " (--resume-max-events); ask for fewer tokens, or for a stream that is not resumable.",
    )


async def look_for_readers(gen: Generation, log: ReplayLog, store: Store, grace: float) -> None:
    """Cancel a generation nobody has read for ``grace`` seconds."""
    if await store.tick(log):  # someone reads it in another process
        log.left_at = trio.current_time() if log.readers == 0 else None
    if log.left_at is not None and trio.current_time() - log.left_at >= grace:
        gen.cancel("client_disconnect")


# endregion: produce


# region: store
class Registry:
    """The logs this process keeps, oldest first, within the two bounds."""

    def __init__(self, max_generations: int, window: float) -> None:
        self.max_generations = max_generations
        self.window = window
        self.logs: OrderedDict[str, ReplayLog] = OrderedDict()

    def add(self, log: ReplayLog) -> None:
        self.make_room()
        self.logs[log.gen_id] = log

    def make_room(self) -> None:
        """Forget the oldest ended log if the next one would not fit; 429
        if every log belongs to a running generation."""
        self._forget_expired()
        if len(self.logs) >= self.max_generations:
            oldest_ended = next((k for k, v in self.logs.items() if v.ended), None)
            if oldest_ended is None:
                raise APIError(
                    429,
                    f"Too many resumable streams: {len(self.logs)} are running"
                    f" (--resume-max-generations {self.max_generations}).",
                    code="too_many_resumable_streams",
                )
            del self.logs[oldest_ended]

    def get(self, gen_id: str) -> ReplayLog | None:
        self._forget_expired()
        return self.logs.get(gen_id)

    def _forget_expired(self) -> None:
        now = trio.current_time()
        for gen_id in [k for k, v in self.logs.items() if v.ended and v.ended_at + self.window <= now]:
            del self.logs[gen_id]


class Store:
    """The default store: this process's memory.  A resume must reach the
    process that runs the generation; ``redis_store.py`` lifts that."""

    class Unavailable(ModelError):
        """The shared store failed (never raised by the memory store)."""

    def __init__(self, config: Config) -> None:
        self.registry = Registry(config.resume_max_generations, config.resume_window)
        # How often a producer looks for readers (the grace) and, with
        # Redis, renews its lease and a mirror does its bookkeeping.
        self.period = min(1.0, config.resume_grace / 4)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        yield self  # nothing to connect to

    def create(self, gen: Generation) -> ReplayLog:
        log = ReplayLog(gen.id, gen)
        self.registry.add(log)
        return log

    async def appended(self, log: ReplayLog, entries: list[Entry]) -> None:
        """The producer added ``entries`` (already readable here)."""

    async def tick(self, log: ReplayLog) -> bool:
        """Called by the producer now and then; True if a reader in another
        process follows the log (none can, here)."""
        return False

    async def find(self, gen_id: str) -> ReplayLog | None:
        """The log of ``gen_id``, wherever it runs; None: unknown or expired."""
        return self.registry.get(gen_id)

    async def cancel_elsewhere(self, gen_id: str) -> ReplayLog | None:
        """Ask whichever process runs ``gen_id`` to cancel it; its log, or
        None if no process knows it (here: none other exists)."""
        return None


# endregion: store
