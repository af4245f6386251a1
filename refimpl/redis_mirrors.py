"""Mirrors: this process's copies of generations running in other processes
(``--store redis://``, lesson 11).

Strategy
--------
A resume can land on any process behind the load balancer.  When it lands
on one that does not run the generation, ``redis_store.py`` makes a
*mirror*: a :class:`~refimpl.patterns.resume.ReplayLog` like the producer's,
which this module fills from the generation's Redis Stream, and which the
resumed readers follow exactly as they would follow a local log.

One task copies *every* mirrored stream: a single ``XREAD BLOCK`` names all
of them, each with the id of the last entry copied, so it returns whatever
any of them gained (Redis: "XREAD ... STREAMS key [key ...] id [id ...]").
A round trip through coredis costs ~350 µs of CPU here whatever it carries
(measured, 2026-12-03); a blocked read per mirror, one round trip per event,
cost the mirroring process 634-769 µs per token (``refimpl bench resume``).
After a read the task waits :data:`~refimpl.redis_store.WRITE_EVERY`
seconds, so the next one gathers more; the producers' writer gathers the
same way.  A new mirror interrupts the blocked read (its first events must
not wait for the next tick); cancelling a blocked XREAD drops its
connection, which coredis replaces, and re-reading from the same ids loses
nothing.

Once per tick the task also does the bookkeeping that Redis cannot do for
us: it refreshes the ``reader`` key of mirrors that have readers (so the
producer's grace counts them), and for a mirror that gained nothing it
checks the producer's ``owner`` lease: gone, with no entry after the last
one copied, means the producing process died, and the mirror ends with
``generation_lost``.  A Redis failure ends every mirror with
``store_unavailable``; a later resume builds a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .patterns.resume import REPLAY_BATCH, Entry, ReplayLog, Store

if TYPE_CHECKING:
    from .redis_store import RedisStore


@dataclass
class Mirror:
    log: ReplayLog
    last: bytes = b"0-0"  # the id of the last entry copied
    gained_at: float = field(default_factory=trio.current_time)


class Mirrors:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.following: dict[str, Mirror] = {}
        self._joined = trio.Event()
        self._reading: trio.CancelScope | None = None

    def add(self, log: ReplayLog) -> None:
        self.following[log.gen_id] = Mirror(log)
        self._joined.set()
        if self._reading is not None:  # read the new stream now, not next tick
            self._reading.cancel()

    # region: mirror-follow
    async def run(self) -> None:
        """The one task that copies every mirrored stream."""
        from .redis_store import FAILURES, WRITE_EVERY, key

        store, books_at = self.store, trio.current_time()
        while True:
            if not self.following:
                await self._joined.wait()
            self._joined = trio.Event()
            streams = {key(gen_id, "events"): m.last for gen_id, m in self.following.items()}
            reply = None
            try:
                with trio.CancelScope() as scope:
                    self._reading = scope
                    reply = await store.blocking.xread(
                        streams, count=REPLAY_BATCH, block=round(1000 * store.period)
                    )
                self._reading = None
                if scope.cancelled_caught:  # a new mirror: read again, with it
                    continue
                full = self._copy(reply or {})
                if trio.current_time() >= books_at:
                    books_at = trio.current_time() + store.period
                    await self._bookkeeping()
            except FAILURES as err:
                self._reading = None
                self._end_all(store.unavailable(err))
                await trio.sleep(store.period)
                continue
            if not full:  # a long replay goes on at once; live events wait a little
                await trio.sleep(WRITE_EVERY)

    def _copy(self, reply: dict) -> bool:
        """Add what the read returned; True if a stream filled its COUNT."""
        full = False
        for stream, found in reply.items():
            mirror = self.following.get(as_text(stream).split(":")[1])
            if mirror is None or not found:
                continue
            entries = [_entry(e.identifier, e.field_values) for e in found]
            if entries[0].seq != mirror.log.seq + 1:  # a hole: the stream is not the one we copied
                del self.following[mirror.log.gen_id]
                mirror.log.fail(_gone())
                continue
            mirror.last = _bytes(found[-1].identifier)
            mirror.gained_at = trio.current_time()
            mirror.log.extend(entries)
            full |= len(found) == REPLAY_BATCH
            if mirror.log.ended:
                del self.following[mirror.log.gen_id]
        return full

    # endregion: mirror-follow

    # region: mirror-books
    async def _bookkeeping(self) -> None:
        from .redis_store import key

        store, now = self.store, trio.current_time()
        read = [m for m in self.following.values() if m.log.readers]
        quiet = [m for m in self.following.values() if now - m.gained_at >= store.period]
        if not read and not quiet:
            return
        async with store.redis.pipeline(transaction=False) as pipe:
            for m in read:  # "someone reads it here": the producer's grace waits
                pipe.set(key(m.log.gen_id, "reader"), store.worker, px=store.lease_ms)
            owners = [pipe.exists([key(m.log.gen_id, "owner")]) for m in quiet]
            streams = [pipe.exists([key(m.log.gen_id, "events")]) for m in quiet]
            after = [pipe.xrange(key(m.log.gen_id, "events"), b"(" + m.last, "+", count=1) for m in quiet]
        for m, owner, stream, more in zip(quiet, owners, streams, after, strict=True):
            if await owner or await more or m.log.gen_id not in self.following:
                continue
            del self.following[m.log.gen_id]
            if await stream:  # no lease, nothing after what we copied: its process died
                m.log.fail(_lost(m.log.gen_id))
            else:  # the stream itself is gone: Redis restarted empty (or was flushed)
                m.log.fail(_gone())

    # endregion: mirror-books

    def _end_all(self, err: Store.Unavailable) -> None:
        for m in self.following.values():
            m.log.fail(err)
        self.following.clear()


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def as_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(identifier: str | bytes, fields: dict) -> Entry:
    seq = int(_bytes(identifier).split(b"-")[0])
    get = {as_text(k): v for k, v in fields.items()}.get
    return Entry(seq, _bytes(get("w")), _bytes(get("l")) == b"1")


def _lost(gen_id: str) -> Store.Unavailable:
    return Store.Unavailable(
        "generation_lost",
        f"The process that ran generation {gen_id} stopped before it ended; nobody can finish it.",
    )


def _gone() -> Store.Unavailable:
    return Store.Unavailable(
        "store_unavailable", "The resume store (Redis) lost this stream's log; it cannot go on."
    )
