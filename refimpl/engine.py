"""Generations: the handle between a protocol module and the model.

Strategy
--------
Every protocol (SSE, WebSocket, gRPC) asks the :class:`Engine` for a
:class:`Generation` and then *pulls* tokens from it.  The generation owns the
bookkeeping that must be identical everywhere: an id, the trace (``trace.py``),
the metrics, the admission limits, and a ``cancel(reason)`` that stops the
model at once.

Why pull, and not a model task feeding a channel?  DESIGN §4 measured that
each hand-off between tasks costs trips through the trio scheduler *per
token*, and that doing the model step and the framing in the one task that
writes the response is the cheapest shape.  The protocol's writer calls
:meth:`Generation.pull`: everything already available (:meth:`~Generation.ready`,
no waiting), else block for at least one token (:meth:`~Generation.wait`), so
when the model is faster than the socket several tokens leave in one write.
Nothing is buffered: a writer that is blocked on a slow socket is simply not
pulling, so the model is not stepping (backpressure, lesson 10).  And no
nursery or cancel scope is held open across a ``yield`` of the response body
generator (DESIGN §4): the only cancel scope lives inside ``wait()``.

What a pull returns.  ``ready()`` returns the tokens available now, maybe
none; ``wait()`` and ``pull()`` return tokens (never an empty list), :data:`FINISHED`, or
:data:`SILENT` (no token for ``timeout`` seconds: time for a heartbeat,
``patterns/heartbeat.py``).  Failures are exceptions, never return values:
:class:`~refimpl.backend.ModelError` when the model failed (lesson 07; a bug
in a backend becomes ``internal_error``, and ``--generation-timeout``
becomes ``timeout``), :class:`GenerationCancelled` once it was cancelled.

How it ends.  A generation ends exactly once, with one of the trace's terminal
events: ``done`` (the model finished), ``error(code)`` (it failed), or
``cancelled(reason)``: someone called :meth:`Generation.cancel` -- a
WebSocket ``cancel`` message, shutdown, or the writer itself, whose
``finally`` finds the generation not :attr:`~Generation.finished` because
the client went away first, or, for a writer that never ran, the end of the
request that started it (:meth:`Engine.serving`).  The active-generations
gauge is decremented there and only there.
"""

from __future__ import annotations

import contextvars
import enum
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import access_log
from .backend import Backend, Interrupted, ModelError, ModelRequest, TokenStream, count_tokens
from .metrics import Metrics
from .patterns import errors
from .patterns.errors import APIError
from .trace import Trace

if TYPE_CHECKING:
    from .limits import Limits


class GenerationCancelled(Exception):
    """Raised by ``wait()`` and ``ready()`` once the generation was cancelled
    (:meth:`Generation.cancel`); ``reason`` says why (lesson 09)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# region: pull-outcomes
class Idle(enum.Enum):
    """What :meth:`Generation.wait` returns when it has no tokens to give."""

    #: The model is done: send the ending (finish_reason, usage, [DONE]).
    FINISHED = "finished"
    #: No token came for ``timeout`` seconds: the writer's cue for a heartbeat.
    SILENT = "silent"


FINISHED, SILENT = Idle.FINISHED, Idle.SILENT
# endregion: pull-outcomes

#: Pulls that found tokens ready between two trips through the scheduler
#: (:meth:`Generation.pull`).
YIELD_EVERY = 8


class _NotStarted:
    """Stands in for the model's stream until the generation is admitted."""

    completion_tokens = 0
    finish_reason = None

    def __init__(self, request: ModelRequest) -> None:
        self.prompt_tokens = count_tokens(request.prompt)

    def poll(self) -> None:  # nothing is ever ready before the model starts
        return None


class Generation:
    def __init__(self, engine: Engine, request: ModelRequest, protocol: str) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.request = request
        self.protocol = protocol
        self.resumable = False  # its events are logged for a resume (patterns/resume.py)
        self._pulled = False  # a writer has asked for a token (Engine.serving)
        self.trace = Trace(self.id)
        self._engine = engine
        # Stamp "accepted" before the model starts, so that the model's own
        # clock (its TTFT deadline) never starts before the trace's.
        accepted = self.trace.record("accepted", 0)
        # --generation-timeout: past this moment the generation fails with
        # code "timeout", however busy or silent the model is.
        self._deadline = accepted.at + (engine.generation_timeout or math.inf)
        # The model starts when the engine admits the generation (at once,
        # or when a slot frees up: lesson 09, "the queue").
        self._stream: TokenStream = _NotStarted(request)
        self._admitted = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._waiter: trio.lowlevel.Task | None = None  # (the clock fast path)
        self._cancel_reason: str | None = None
        self._error: ModelError | None = None
        self._ready_pulls = 0
        # Whether the last pull found tokens already waiting: the writer, not
        # the model, was the slow one (``patterns/backpressure.py`` reads it).
        self.behind = False
        # Called just before the generation ends, however it ends (the
        # backpressure flow notes a write still blocked then).
        self.on_end: Callable[[], None] | None = None
        # Set when the generation ends, however it ends, so that tests (and
        # anything else that must know) wait on it instead of polling.
        self.ended = trio.Event()

    # -- what the model has done so far -------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return self._stream.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._stream.completion_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def stop_sequence(self) -> str | None:
        """Which of the request's stop sequences ended it, if its backend
        can tell (the simulated model can; an OpenAI-compatible upstream says
        only "stop"): Anthropic's ``stop_sequence`` (``anthropic_messages.py``)."""
        return getattr(self._stream, "stop_sequence", None)

    @property
    def finished(self) -> bool:
        """Ended, one way or another (done, error, or cancelled)."""
        return self.trace.finished

    @property
    def metrics(self) -> Metrics:
        """The engine's metrics: a writer's own gauges (paused streams) go there."""
        return self._engine.metrics

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- pulling tokens ------------------------------------------------------
    # region: generation-pull
    async def pull(self, limit: int = 64, timeout: float = math.inf) -> list[str] | Idle:
        """The writers' one call: the tokens ready now, else wait for some.

        Returns what :meth:`wait` returns.  When tokens are ready (the model
        is ahead of the socket) nothing else here would wait, and a writer
        whose writes do not wait either -- hypercorn drops the writes to a
        closed WebSocket without a checkpoint -- would never let the task
        that hears the client leave run, nor hear the cancel it sends: it
        would run the model to the end for nobody (lesson 09).  So every
        :data:`YIELD_EVERY`-th such pull passes through the scheduler, and
        the others take a cancel that is already pending (a check that costs
        no trip).  A client that leaves is noticed within ``YIELD_EVERY``
        writes.  Measured at one write per token (``refimpl bench
        --batch-tokens 1``, 2026-12-02, server CPU per token): no
        checkpoint 13.5-15.7 µs, one every pull 18.0-20.4 µs, every 8th
        15.6-17.1 µs.
        """
        tokens = self.ready(limit)
        self.behind = bool(tokens)
        if not tokens:
            return await self.wait(limit, timeout)
        self._ready_pulls += 1
        if self._ready_pulls % YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        return tokens

    async def wait(self, limit: int = 64, timeout: float = math.inf) -> list[str] | Idle:
        """Wait for the next token, then take whatever else is ready.

        Returns a non-empty list of tokens, :data:`FINISHED`, or
        :data:`SILENT` if ``timeout`` seconds passed with no token.  Raises
        :class:`ModelError` if the model failed (or the generation ran past
        ``--generation-timeout``), :class:`GenerationCancelled` if it was
        cancelled.  One cancel scope serves the timeout, the deadline and
        :meth:`cancel`, and the model's ``next()`` is cancel-safe, so a
        timeout loses no token.
        """
        self._pulled = True
        self._raise_pending_error()
        silent_at = trio.current_time() + timeout
        until = min(silent_at, self._deadline)
        token, timed_out = None, False
        if self._admitted.is_set() and (due := self._due()) is not None and due < until:
            token = await self._next_on_the_clock()  # lesson 13: no cancel scope
        else:
            with trio.CancelScope(deadline=until) as self._scope:
                if self._cancel_reason is not None:
                    self._scope.cancel()
                try:
                    await self._admitted.wait()  # queued: a slot first (heartbeats meanwhile)
                    token = await self._stream.next()
                except Exception as err:
                    self._error = self._failure(err)
            timed_out, self._scope = self._scope.cancelled_caught, None
        if self._cancel_reason is not None:
            raise GenerationCancelled(self._cancel_reason)
        self._raise_pending_error()
        if timed_out:
            return SILENT
        if token is None:
            self._end("done", self.finish_reason)
            return FINISHED
        self._produced(1)
        return [token, *self._drain(limit - 1)]

    def ready(self, limit: int = 64) -> list[str]:
        """Every token available *now*, without waiting: maybe none.

        An empty list only means "nothing right now"; whether the model has
        finished is for :meth:`wait` to say.  If the model fails after some
        tokens, those are still returned and the error is raised by the next
        call: nothing already made is lost.
        """
        self._pulled = True
        if self._cancel_reason is not None:  # cancelled: the model is stopped
            raise GenerationCancelled(self._cancel_reason)
        tokens = self._drain(limit)
        if not tokens:
            self._raise_pending_error()
        return tokens

    def _drain(self, limit: int) -> list[str]:
        """Poll the model until it has nothing ready; a failure is kept for
        later (``_error``) so that the tokens before it still go out."""
        tokens: list[str] = []
        if self._error is not None or self._past_deadline():
            return tokens
        poll = self._stream.poll
        try:
            while len(tokens) < limit and (token := poll()) is not None:
                tokens.append(token)
        except Exception as err:
            self._error = self._failure(err)
        if tokens:
            self._produced(len(tokens))
        return tokens

    # endregion: generation-pull

    # -- the timer fast path (lesson 13) ------------------------------------
    def _due(self) -> float | None:
        """When the model's next token is due, if its stream can say."""
        due = getattr(self._stream, "due", None)
        return None if due is None or self._cancel_reason is not None else due()

    async def _next_on_the_clock(self) -> str | None:
        """``next()`` without a cancel scope: the token is due before the
        silence or the deadline could end the wait, so only :meth:`cancel`
        can, and it wakes us through the stream's ``interrupt()``
        (``simclock.py``: a scope per token cost as much as the wait)."""
        self._waiter = trio.lowlevel.current_task()
        try:
            return await self._stream.next()
        except Interrupted:  # cancel() woke us; the caller raises GenerationCancelled
            return None
        except Exception as err:
            self._error = self._failure(err)
            return None
        finally:
            self._waiter = None

    def _failure(self, err: Exception) -> ModelError:
        """A ModelError is an expected failure; anything else is a bug."""
        return err if isinstance(err, ModelError) else errors.from_bug(err, self.id)

    def _past_deadline(self) -> bool:
        return self._deadline < math.inf and trio.current_time() >= self._deadline

    def _raise_pending_error(self) -> None:
        if self._error is None and self._past_deadline():
            limit = self._engine.generation_timeout
            self._error = ModelError("timeout", f"The generation did not finish within {limit:g} s.")
        if self._error is not None:
            self._end("error", self._error.code)
            raise self._error

    # region: first-token
    def _produced(self, n: int) -> None:
        """``n`` tokens go to the writer now: the trace and the metrics
        (TTFT, the inter-token gaps, tokens) are kept here, the one place
        every protocol's tokens pass (``metrics.py``, lesson 14)."""
        now = trio.current_time()
        if self.completion_tokens == n:  # the first ones: TTFT ends here
            self.trace.record("first_token", n, at=now)
            self._engine.metrics.first_tokens(self.protocol, now - self.trace.events[0].at, n)
        else:
            self._engine.metrics.more_tokens(self.protocol, now - self._last_token_at, n)
        self._last_token_at = now  # (first set with the first token, read only after it)

    # endregion: first-token

    # -- ending --------------------------------------------------------------
    # region: generation-cancel
    def cancel(self, reason: str) -> None:
        """Stop the model at once; the writer's ``wait()`` raises
        :class:`GenerationCancelled` (lesson 09)."""
        if self.trace.finished:  # done, failed, or already cancelled
            return
        self._cancel_reason = reason
        self._end("cancelled", reason)
        if self._scope is not None:
            self._scope.cancel()
        elif self._waiter is not None:  # asleep in _next_on_the_clock
            self._stream.interrupt(self._waiter)

    # endregion: generation-cancel

    def _admit(self) -> None:
        """The engine gave this generation a slot: start the model."""
        self._stream = self._engine.backend.start(self.request)
        self._admitted.set()

    # region: generation-opened
    async def opened(self, timeout: float, headers: dict[str, str] | None = None) -> None:
        """Before a streamed response starts: wait, at most ``timeout``
        seconds, until the model's stream has started, so that a model that
        cannot start at all -- an upstream that refuses the connection, our
        key or the request (``upstream.py``, lesson 14) -- gets a status
        line of its own (an :class:`APIError`, ``headers`` on it), not a 200
        and then an error event (lesson 07).

        It waits only for a generation admitted at once whose stream has an
        ``opened()``; a queued one, or the simulated model, returns at once.
        Past ``timeout`` -- the heartbeat interval: longer, and the client
        would have heard a ``: ping`` by then -- it returns too, the
        response starts, and heartbeats cover the rest of the wait, as
        before.  A cancel (shutdown) raises its status; a caller cancelled
        here (its client left) cancels the generation on its way out.
        """
        opened = getattr(self._stream, "opened", None)
        if opened is None or not self._admitted.is_set() or self.finished:
            return
        try:
            until = min(trio.current_time() + timeout, self._deadline)
            with trio.CancelScope(deadline=until) as self._scope:  # cancel() cancels it too
                try:
                    await opened()
                except Exception as err:
                    self._error = self._failure(err)
        except trio.Cancelled:  # not ours: the caller's (its client left)
            self.cancel("client_disconnect")
            raise
        finally:
            self._scope = None
        if self._cancel_reason is not None:
            err = errors.cancelled_error(self._cancel_reason)
            raise errors.failure_status(err, self._engine.retry_after, headers or {})
        if self._error is not None:
            self._end("error", self._error.code)
            raise errors.failure_status(self._error, self._engine.retry_after, headers or {})

    # endregion: generation-opened

    def fail(self, bug: Exception) -> ModelError:
        """A writer's own bug mid-stream: logged with its traceback and
        recorded as ``error(internal_error)``, like a bug in a backend; the
        returned error is what the writer tells its client (lesson 07)."""
        err = errors.from_bug(bug, self.id)
        self._end("error", err.code)
        return err

    def end_with(self, err: ModelError) -> None:
        """End with an expected failure that is not the model's: a
        resumable stream's log that is full or cannot be written
        (``patterns/resume.py``).  Nothing pulls it any more."""
        self._end("error", err.code)

    def heartbeat(self) -> None:
        self.trace.record("heartbeat", self.completion_tokens)
        self._engine.metrics.heartbeats.inc()

    def _end(self, name: str, detail: str | None) -> None:
        if self.trace.finished:
            return
        if self.on_end is not None:
            self.on_end()
        # A stream that holds something open (upstream.py: a request to the
        # upstream) closes it now, however the generation ended, so that a
        # cancel reaches the real model at once (TokenStream.close, lesson 14).
        if (close := getattr(self._stream, "close", None)) is not None:
            close()
        self.trace.record(name, self.completion_tokens, detail)
        if name == "error":
            errors.log_failure(self.id, detail, self.completion_tokens)
        self._engine._finished(self, name, detail)
        self.ended.set()

    def to_json(self) -> dict[str, Any]:
        return self.trace.to_json(
            protocol=self.protocol,
            model=self.request.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=self.finish_reason,
        )


#: The generations started by the request being served in this context
#: (each task copies its parent's context, so a route's tasks see it).
_SERVING: contextvars.ContextVar[list[Generation] | None] = contextvars.ContextVar(
    "refimpl_serving", default=None
)


class Engine:
    """Admits generations (at once, or after a bounded queue), tracks the
    running ones, remembers recent ones."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        *,
        max_active: int = 1024,
        max_queue: int = 0,
        keep_finished: int = 512,
        generation_timeout: float | None = None,
        retry_after: float = 1.0,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_active = max_active  # generations the model runs at once
        self.max_queue = max_queue  # more may wait for a slot, in order
        self.generation_timeout = generation_timeout
        self.retry_after = retry_after  # what 429 and 503 tell clients to wait
        self.accepting = True
        self.active: dict[str, Generation] = {}  # running: admitted, not ended
        self.queued: OrderedDict[str, Generation] = OrderedDict()  # waiting, oldest first
        self._idle = trio.Event()  # set whenever no generation runs or waits
        self._idle.set()
        self._recent: OrderedDict[str, Generation] = OrderedDict()
        self._keep = keep_finished
        # Per-request and per-client limits (limits.py, lesson 14), checked
        # by start() for every protocol; None: none.  create_app installs them.
        self.limits: Limits | None = None

    # region: admission
    def start(self, request: ModelRequest, protocol: str) -> Generation:
        """A new generation: running at once if a slot is free, else queued
        (it waits inside its first ``pull()``), else refused with 429."""
        if not self.accepting:
            raise APIError(
                503,
                "The server is shutting down; try again (elsewhere).",
                code="server_shutting_down",
                retry_after=self.retry_after,
            )
        # Limits of one request or one client: 400 or 429 (lesson 14).
        client = self.limits.admit(request) if self.limits is not None else None
        free = len(self.active) < self.max_active
        if not free and len(self.queued) >= self.max_queue:
            raise APIError(
                429,
                f"Too many requests: {self.max_active} generations running and"
                f" {len(self.queued)} waiting (limits {self.max_active} and {self.max_queue}).",
                code="too_many_requests",
                retry_after=self.retry_after,
            )
        gen = Generation(self, request, protocol)
        if self.limits is not None:
            self.limits.track(client, gen)  # counted until it ends, however
        if (owned := _SERVING.get()) is not None:  # ends with its request at the latest (serving)
            owned[:] = [*(g for g in owned if not g.finished), gen]
        self.metrics.generations.inc()
        if self._idle.is_set():
            self._idle = trio.Event()
        if free:
            self._run(gen)
        else:
            self.queued[gen.id] = gen
            gen.trace.record("queued", 0)
            self.metrics.queued.inc()
        return gen

    def _run(self, gen: Generation) -> None:
        self.active[gen.id] = gen
        self.metrics.active.inc()
        gen._admit()

    # endregion: admission

    def get(self, gen_id: str) -> Generation | None:
        return self.active.get(gen_id) or self.queued.get(gen_id) or self._recent.get(gen_id)

    # region: request-owns-generations
    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around one request (or one WebSocket, ``app.serve()``): what it
        starts ends with it.  A writer ends its generation in its ``finally``,
        but only a writer that ran: Quart iterates a streamed body after the
        route returned (after :meth:`start`) and after the response's first
        ``send``, and a client that leaves in between cancels the request
        before the body's ``try`` is entered.  Its generation then ran on,
        pulled by no one, for good: the active gauge stuck at 1 after a
        fault load (lesson 14; one hang-up with RST right after the request
        did it every time).  So a generation its request left running and
        no writer ever pulled is one whose client is gone: cancelled
        (``client_disconnect``).  One a writer pulled is that writer's to
        end -- lesson 09's zombie, which never does, stays a zombie to
        study -- and a resumable stream's is meant to outlive its request
        (lesson 11)."""
        owned: list[Generation] = []
        token = _SERVING.set(owned)
        try:
            yield
        finally:
            _SERVING.reset(token)
            for gen in owned:
                if not gen.finished and not gen.resumable and not gen._pulled:
                    gen.cancel("client_disconnect")

    # endregion: request-owns-generations

    async def wait_idle(self) -> None:
        """Return once no generation runs or waits (graceful shutdown's drain)."""
        await self._idle.wait()

    def cancel_all(self, reason: str) -> None:
        for gen in [*self.queued.values(), *self.active.values()]:
            gen.cancel(reason)

    # region: slot-freed
    def _finished(self, gen: Generation, name: str, detail: str | None) -> None:
        if self.queued.pop(gen.id, None) is not None:  # it never started
            self.metrics.queued.dec()
        elif self.active.pop(gen.id, None) is not None:
            self.metrics.active.dec()
            while self.queued and len(self.active) < self.max_active:  # a slot is free
                self.metrics.queued.dec()
                _, waiting = self.queued.popitem(last=False)
                waiting.trace.record("admitted", 0)
                self._run(waiting)
        else:
            return
        if not self.active and not self.queued:
            self._idle.set()
        if name == "cancelled":
            self.metrics.cancellations.labels(reason=detail).inc()
        elif name == "error":
            self.metrics.errors.labels(reason=detail).inc()
        # From "accepted" to this ending (the trace's first and last events).
        self.metrics.ended(gen.protocol, name, gen.trace.events[-1].at - gen.trace.events[0].at)
        self._recent[gen.id] = gen
        access_log.generation_ended(gen, name, detail)
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)

    # endregion: slot-freed
