"""Per-generation lifecycle trace: what happened, when, and how many tokens by then.

Strategy
--------
Streaming bugs are timing bugs: a token that arrived late, a cancel that came
after the model already finished, a heartbeat that never fired.  Logs are the
wrong tool to *test* those, because they are text meant for people.  Instead
every generation carries a :class:`Trace`: an append-only list of
:class:`TraceEvent` records, each stamped with ``trio.current_time()`` (the
monotonic clock of the running trio loop, so tests driven by
``trio.testing.MockClock`` get exact, reproducible stamps) and with the number
of completion tokens produced at that moment.

The event names are part of the public interface (DESIGN §2, "Trace"):

``accepted``      the request passed validation and a generation exists
``queued`` / ``admitted``   no slot was free, so it waited (``--max-queue``),
                  then a slot freed and the model started (lesson 09)
``first_token``   the model produced its first token (TTFT ends here)
``paused`` / ``resumed``   backpressure stopped / restarted the model:
                  the client read slower than the model wrote
                  (``patterns/backpressure.py``, lesson 10)
``heartbeat``     a keep-alive went out while the generation ran: an SSE
                  ``: ping`` comment or a WebSocket ping frame
                  (``patterns/heartbeat.py``, lesson 08)
``error``         the generation failed; ``detail`` holds the error code
                  (``patterns/errors.py``, lesson 07)
``cancelled``     it was stopped early; ``detail`` is the reason:
                  ``client_disconnect``, ``client_cancel``, ``shutdown``,
                  and on the WebSocket ``protocol_error``,
                  ``internal_error`` (a bug in its reader: close 1011),
                  ``ping_timeout``, ``stall_timeout``, ``message_too_big``
``done``          it finished normally; ``detail`` is the finish_reason
``attached`` / ``detached``  a reader of a resumable stream came / went
                  (``detail``: the ``Last-Event-ID`` it resumed after;
                  ``patterns/resume.py``, lesson 11)

Tests, lessons, notebooks and the demo page read traces through
``GET /v1/debug/generations/{id}`` (a route of ``app.py``) and through
:meth:`Trace.to_json`.  Lesson 00 uses the ``accepted`` → ``first_token``
distance to show what streaming buys; lesson 09 uses ``cancelled``.
``/metrics`` (``metrics.py``, lesson 14) takes its TTFT and its generation
durations from these same stamps (``accepted`` to ``first_token``,
``accepted`` to the terminal event), so a chart and a trace never disagree.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import trio

#: Events after which a generation is over; exactly one of them ends a trace.
TERMINAL = frozenset({"done", "error", "cancelled"})


@dataclass(frozen=True, slots=True)
class TraceEvent:
    name: str
    at: float  # trio.current_time(), seconds on the loop's monotonic clock
    tokens: int  # completion tokens produced when this happened
    detail: str | None = None


@dataclass(slots=True)
class Trace:
    id: str
    events: list[TraceEvent] = field(default_factory=list)

    # region: trace-record
    def record(
        self, name: str, tokens: int, detail: str | None = None, at: float | None = None
    ) -> TraceEvent:
        """Append one event stamped with the loop clock.

        A trace ends at its first terminal event: a late ``cancelled`` after
        ``done`` (the client hung up just as the last byte left) would be a
        lie about what the model did, so it is dropped and the first ending
        stands.  ``at`` stamps an event that is known only after it happened
        (a ``paused`` is known when the blocked write returns); it goes in
        its place in time, so the events stay in order.
        """
        if self.finished:
            return self.events[-1]
        event = TraceEvent(name, trio.current_time() if at is None else at, tokens, detail)
        if at is None or not self.events or self.events[-1].at <= at:
            self.events.append(event)
        else:
            bisect.insort(self.events, event, key=lambda e: e.at)
        return event

    # endregion: trace-record

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].name in TERMINAL

    def first(self, name: str) -> TraceEvent | None:
        """The first event called ``name``, or None."""
        return next((e for e in self.events if e.name == name), None)

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The JSON body of ``GET /v1/debug/generations/{id}``."""
        return {
            "id": self.id,
            "events": [
                {"name": e.name, "at": e.at, "tokens": e.tokens, "detail": e.detail} for e in self.events
            ],
            "finished": self.finished,
            **extra,
        }
