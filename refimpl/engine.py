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
:meth:`Generation.wait` (block for at least one token) and then
:meth:`Generation.ready` (everything else already available, no waiting), so
when the model is faster than the socket several tokens leave in one write.
Nothing is buffered: a writer that is blocked on a slow socket is simply not
pulling, so the model is not stepping (backpressure, lesson 10).  And no
nursery or cancel scope is held open across a ``yield`` of the response body
generator (DESIGN §4): the only cancel scope lives inside ``wait()``.

How it ends.  A generation ends exactly once, with one of the trace's terminal
events: ``done`` (the model finished), ``error`` (the model raised
:class:`~refimpl.model.ModelError`), or ``cancelled(reason)``: either someone
called :meth:`Generation.cancel` (a WebSocket ``cancel`` message, shutdown) or
the writer's ``finally`` called :meth:`Generation.close` because the client
went away.  The active-generations gauge is decremented there and only there.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from typing import Any

import trio

from .metrics import Metrics
from .model import Backend, ModelError, ModelRequest, TokenStream
from .patterns.errors import APIError
from .trace import Trace


class GenerationCancelled(Exception):
    """Raised from ``wait()`` when :meth:`Generation.cancel` stopped the model."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Generation:
    def __init__(self, engine: Engine, request: ModelRequest, protocol: str) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.request = request
        self.protocol = protocol
        self.trace = Trace(self.id)
        self._engine = engine
        # Stamp "accepted" before the model starts, so that the model's own
        # clock (its TTFT deadline) never starts before the trace's.
        self.trace.record("accepted", 0)
        self._stream: TokenStream = engine.backend.start(request)
        self._scope: trio.CancelScope | None = None
        self._cancel_reason: str | None = None
        self._error: ModelError | None = None
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

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- pulling tokens ------------------------------------------------------
    # region: generation-pull
    async def wait(self, limit: int = 64, timeout: float = math.inf) -> list[str] | None:
        """Wait for the next token, then take whatever else is ready.

        Returns ``[]`` when the model has finished, and ``None`` if ``timeout``
        seconds pass with no token (the SSE writer's cue for a heartbeat).
        One cancel scope serves both that timeout and :meth:`cancel`, and the
        model's ``next()`` is cancel-safe, so a timeout loses no token.
        """
        self._raise_pending_error()
        with trio.CancelScope(deadline=trio.current_time() + timeout) as self._scope:
            if self._cancel_reason is not None:
                self._scope.cancel()
            try:
                token = await self._stream.next()
            except ModelError as err:
                self._error = err
        timed_out, self._scope = self._scope.cancelled_caught, None
        if self._cancel_reason is not None:
            raise GenerationCancelled(self._cancel_reason)
        self._raise_pending_error()
        if timed_out:
            return None
        if token is None:
            self._end("done", self.finish_reason)
            return []
        self._produced(1)
        return [token, *self.ready(limit - 1)]

    def ready(self, limit: int = 64) -> list[str]:
        """Every token available *now*, without waiting (maybe none).

        If the model fails after some of them, those are still returned and
        the error is raised by the next call: nothing already made is lost.
        """
        if self._cancel_reason is not None:  # cancelled: the model is stopped
            raise GenerationCancelled(self._cancel_reason)
        tokens: list[str] = []
        poll = self._stream.poll
        try:
            while len(tokens) < limit and (token := poll()) is not None:
                tokens.append(token)
        except ModelError as err:
            self._error = err
        if tokens:
            self._produced(len(tokens))
        else:
            self._raise_pending_error()
        return tokens
    # endregion: generation-pull

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._end("error", self._error.code)
            raise self._error

    # region: first-token
    def _produced(self, n: int) -> None:
        if self.completion_tokens == n:
            self.trace.record("first_token", n)
        self._engine.metrics.tokens.inc(n)
    # endregion: first-token

    # -- ending --------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Stop the model at once; the writer's ``wait()`` raises
        :class:`GenerationCancelled` (lesson 09)."""
        if self.trace.finished:  # done, failed, or already cancelled
            return
        self._cancel_reason = reason
        self._end("cancelled", reason)
        if self._scope is not None:
            self._scope.cancel()

    def heartbeat(self) -> None:
        self.trace.record("heartbeat", self.completion_tokens)
        self._engine.metrics.heartbeats.inc()

    def close(self, reason: str = "client_disconnect") -> None:
        """Called from the writer's ``finally``: if nothing ended the
        generation yet, the writer is leaving early, so it was cancelled."""
        self.cancel(reason)

    def _end(self, name: str, detail: str | None) -> None:
        if self.trace.finished:
            return
        self.trace.record(name, self.completion_tokens, detail)
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


class Engine:
    """Admits generations, tracks the running ones, remembers recent ones."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        *,
        max_active: int = 1024,
        keep_finished: int = 512,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_active = max_active
        self.accepting = True
        self.active: dict[str, Generation] = {}
        self._recent: OrderedDict[str, Generation] = OrderedDict()
        self._keep = keep_finished

    def start(self, request: ModelRequest, protocol: str) -> Generation:
        if not self.accepting:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        if len(self.active) >= self.max_active:
            raise APIError(
                429,
                f"Too many concurrent generations (limit {self.max_active}).",
                code="too_many_generations",
            )
        gen = Generation(self, request, protocol)
        self.active[gen.id] = gen
        self.metrics.generations.inc()
        self.metrics.active.inc()
        return gen

    def get(self, gen_id: str) -> Generation | None:
        return self.active.get(gen_id) or self._recent.get(gen_id)

    def cancel_all(self, reason: str) -> None:
        for gen in list(self.active.values()):
            gen.cancel(reason)

    def _finished(self, gen: Generation, name: str, detail: str | None) -> None:
        if self.active.pop(gen.id, None) is None:
            return
        self.metrics.active.dec()
        if name == "cancelled":
            self.metrics.cancellations.labels(reason=detail).inc()
        elif name == "error":
            self.metrics.errors.labels(reason=detail).inc()
        self._recent[gen.id] = gen
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)
