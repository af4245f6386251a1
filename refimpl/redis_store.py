"""``refimpl serve --store redis://HOST:PORT/DB``: resumable streams shared by
every process (lesson 11, "scale-out").

Strategy
--------
With the memory store (``patterns/resume.py``) a resume must reach the one
process that runs the generation, and a load balancer will not know which
one that is.  Here each generation's log also goes to a **Redis Stream**, so
any process can serve any resume:

``refimpl:{id}:events``  the stream.  Entry ``<seq>-0`` holds one SSE event
    (its bytes, ``id:`` line included) and whether it is the last.  Redis
    accepts an explicit id only if it is greater than the stream's last, so
    a write can never be doubled.  XADD carries ``MAXLEN ~`` as a safety cap
    (the producer ends a generation before it gets there); ``PEXPIRE`` keeps
    the stream ``--resume-window`` seconds after its end.
``refimpl:{id}:owner``   a lease, refreshed by the producing process every
    tick.  A SIGKILLed process stops refreshing it: a follower that finds
    it gone and the stream unfinished ends with ``generation_lost`` instead
    of waiting for ever.
``refimpl:{id}:reader``  refreshed while a process elsewhere has a reader,
    so the producer's grace (no reader: cancel) counts readers everywhere.
``refimpl:{id}:cancel`` and the channel ``refimpl:cancel``: ``POST
    .../cancel`` on any process sets the key and publishes the id; the
    producing process cancels at once on the message, or at its next tick
    from the key (Redis pub/sub delivers at most once: a message sent while
    a subscriber reconnects is lost).

A process that gets a resume for a generation running elsewhere keeps a
*mirror*: a :class:`~refimpl.patterns.resume.ReplayLog` copied from the
stream, which its readers follow exactly as they follow a local log
(``redis_mirrors.py``: one task and one blocked XREAD for all of them).
Writes go the other way through one writer task (:meth:`RedisStore.appended`).

Why coredis (6.9): it is built on anyio, so it runs under trio as is: trio
sockets, trio cancellation, no thread or asyncio bridge.  Measured before we
chose it: a cancelled ``XREAD BLOCK`` drops its own connection and leaves
the client usable; a cancelled pub/sub wait loses no message; it reconnects
after Redis restarts.  valkey-glide also runs under trio, but a cancelled
blocking XREAD wedged its client and a cancelled pub/sub wait swallowed the
next message; redis-py's asyncio client does not run under trio at all.
Retries are off: a failure becomes ``store_unavailable``, said once, in the
stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from .config import Config
from .patterns.errors import APIError
from .patterns.resume import Entry, ReplayLog, Store
from .redis_mirrors import Mirrors, _gone, as_text

log = logging.getLogger("refimpl")

CHANNEL = "refimpl:cancel"
#: Seconds the writer gathers events before a pipeline (``RedisStore.appended``).
WRITE_EVERY = 0.01
#: Events queued for Redis before producers wait.
WRITE_QUEUE = 10_000
#: What a store call may raise when Redis is down, slow or gone.
FAILURES = (RedisError, TimeoutError, OSError)


def key(gen_id: str, part: str) -> str:
    return f"refimpl:{gen_id}:{part}"


class RedisStore(Store):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.url = config.store
        self.lease_ms = round(3000 * self.period)
        self.window_ms = round(1000 * config.resume_window)
        self.max_events = config.resume_max_events
        self.worker = str(os.getpid())
        # The writer's queue (appended / _write): (generation id, entries).
        self._queue: list[tuple[str, list[Entry]]] = []
        self._queued = 0
        self._more, self._drained = trio.Event(), trio.Event()
        self._failed: dict[str, Store.Unavailable] = {}
        self.mirrors = Mirrors(self)

    # region: redis-open
    @asynccontextmanager
    async def open(self) -> AsyncIterator[RedisStore]:
        options: dict[str, Any] = {
            "retry_policy": NoRetryPolicy(),
            "connect_timeout": 2.0,
            "pool_timeout": 2.0,
        }
        # Commands share one multiplexed connection; each blocked XREAD
        # holds a connection of its own, so mirrors get their own pool.
        self.redis = coredis.Redis.from_url(self.url, stream_timeout=5.0, **options)
        self.blocking = coredis.Redis.from_url(
            self.url, stream_timeout=self.period + 5.0, max_connections=4096, **options
        )
        try:
            async with self.redis, self.blocking, trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._listen_for_cancels)
                nursery.start_soon(self._write)
                nursery.start_soon(self.mirrors.run)
                yield self
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # coredis's task groups wrap what the server raised
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    # endregion: redis-open

    def lost_log(self, gen_id: str) -> Store.Unavailable:
        log.warning("resume store %s: the stream of %s is gone (did Redis restart?)", self.url, gen_id)
        return _gone()

    def unavailable(self, err: BaseException) -> Store.Unavailable:
        log.warning("resume store %s: %s: %s", self.url, type(err).__name__, err)
        return Store.Unavailable(
            "store_unavailable", "The resume store (Redis) is unavailable; this stream cannot go on."
        )

    # region: redis-write
    async def appended(self, log: ReplayLog, entries: list[Entry]) -> None:
        """Queue ``entries`` for the writer task.  A round trip through
        coredis costs ~350 µs of CPU here whatever it carries, and ~55 µs
        more per command (measured, 2026-12-03); a round trip per event
        tripled the producing process's CPU per token (``refimpl bench
        resume``).  So the writer sends one pipeline every
        :data:`WRITE_EVERY` seconds with what every generation appended
        meanwhile: a reader in *another* process sees an event up to that
        much later; readers here read the local log and see it at once.
        Only the first event is written at once, so that a resume on
        another process right after the POST finds the stream.  A producer
        waits only when the queue is full (Redis is slow)."""
        if (err := self._failed.pop(log.gen_id, None)) is not None:
            raise err
        if entries[0].seq == 1:  # the first write goes at once: from now on
            try:  # any process can find the generation
                async with self.redis.pipeline(transaction=False) as pipe:
                    replies = self._add(pipe, log.gen_id, entries)
                if None in [await reply for reply in replies]:
                    raise self.lost_log(log.gen_id)
            except FAILURES as err:
                raise self.unavailable(err) from None
            return
        while self._queued >= WRITE_QUEUE:
            await self._drained.wait()
        self._queue.append((log.gen_id, entries))
        self._queued += len(entries)
        self._more.set()

    async def _write(self) -> None:
        """The writer task: one pipeline per batch, in order."""
        while True:
            await self._more.wait()
            await trio.sleep(WRITE_EVERY)  # let the other generations append too
            self._more = trio.Event()
            batch, self._queue, self._queued = self._queue, [], 0
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    added = [(gen_id, entries, self._add(pipe, gen_id, entries)) for gen_id, entries in batch]
                for gen_id, entries, replies in added:
                    if None in [await reply for reply in replies] and not entries[-1].last:
                        self._failed[gen_id] = self.lost_log(gen_id)
            except FAILURES as err:  # each producer hears it at its next append
                failure = self.unavailable(err)
                self._failed.update((gen_id, failure) for gen_id, entries in batch if not entries[-1].last)
            self._drained.set()
            self._drained = trio.Event()

    def _add(self, pipe: Any, gen_id: str, entries: list[Entry]) -> list[Any]:
        """Queue the commands for ``entries`` on ``pipe``; the XADDs' replies.

        Only the first event may create the stream (NOMKSTREAM on the
        others): a Redis that restarted empty mid-stream then answers the
        next XADD with nil instead of starting a stream with a hole in it,
        and the producer ends with ``store_unavailable``.  (coredis
        reconnects by itself, so a quick restart fails no command at all.)"""
        events, owner = key(gen_id, "events"), key(gen_id, "owner")
        replies = [
            pipe.xadd(
                events,
                {"w": e.wire, "l": b"1" if e.last else b"0"},
                identifier=f"{e.seq}-0",
                nomkstream=e.seq > 1 or None,
                trim_strategy=coredis.PureToken.MAXLEN,
                threshold=self.max_events,
                trim_operator=coredis.PureToken.APPROXIMATELY,
            )
            for e in entries
        ]
        if entries[0].seq == 1:  # the first write: the lease starts
            pipe.set(owner, self.worker, px=self.lease_ms)
            pipe.pexpire(events, self.window_ms + self.lease_ms)
        if entries[-1].last:  # the end: kept for the window, then gone
            pipe.pexpire(events, self.window_ms)
            pipe.delete([owner])
        return replies

    async def tick(self, log: ReplayLog) -> bool:
        """Renew the lease; cancel if asked through the key; True if a
        reader in another process follows this generation."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key(log.gen_id, "owner"), self.worker, px=self.lease_ms)
                pipe.pexpire(key(log.gen_id, "events"), self.window_ms + self.lease_ms)
                reader = pipe.exists([key(log.gen_id, "reader")])
                cancel = pipe.exists([key(log.gen_id, "cancel")])
            if await cancel and log.gen is not None:
                log.gen.cancel("client_cancel")
            return bool(await reader)
        except FAILURES as err:
            raise self.unavailable(err) from None

    # endregion: redis-write

    # region: redis-find
    async def find(self, gen_id: str) -> ReplayLog | None:
        if (found := self._kept(gen_id)) is not None:
            return found
        try:
            if not await self.redis.exists([key(gen_id, "events")]):
                return None
        except FAILURES as err:
            raise APIError(
                503, self.unavailable(err).message, code="store_unavailable", retry_after=1.0
            ) from None
        if (found := self._kept(gen_id)) is not None:  # made by a request that asked meanwhile
            return found
        mirror = ReplayLog(gen_id)  # a copy, filled by redis_mirrors.py
        self.registry.add(mirror)
        self.mirrors.add(mirror)
        return mirror

    def _kept(self, gen_id: str) -> ReplayLog | None:
        """The log kept here: ours, or a mirror still good (a failed one:
        look again, Redis may be back)."""
        found = self.registry.get(gen_id)
        return found if found is not None and (found.gen is not None or found.failure is None) else None

    # endregion: redis-find

    # region: redis-cancel
    async def cancel_elsewhere(self, gen_id: str) -> ReplayLog | None:
        found = await self.find(gen_id)
        if found is None or found.ended:
            return found
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key(gen_id, "cancel"), b"1", px=self.window_ms)
                pipe.publish(CHANNEL, gen_id)
        except FAILURES as err:
            raise APIError(
                503, self.unavailable(err).message, code="store_unavailable", retry_after=1.0
            ) from None
        return found

    async def _listen_for_cancels(self) -> None:
        said = False
        while True:
            try:
                async with self.redis.pubsub(channels=[CHANNEL], ignore_subscribe_messages=True) as messages:
                    said = False
                    async for message in messages:
                        found = self.registry.get(as_text(message["data"]))
                        if found is not None and found.gen is not None:
                            found.gen.cancel("client_cancel")
            except FAILURES as err:  # Redis is down: the cancel key covers the gap
                if not said:  # once per outage
                    log.warning(
                        "resume store %s: cancel channel lost (%s); retrying", self.url, type(err).__name__
                    )
                    said = True
                await trio.sleep(self.period)

    # endregion: redis-cancel
