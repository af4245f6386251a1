"""Limits on what one request, and one client, may ask of the model (lesson 14).

Strategy
--------
A server that streams for anyone must say no before it spends: every limit
here is checked when a generation is *asked for*, in one place that every
route goes through -- :meth:`Engine.start <refimpl.engine.Engine.start>`
calls :meth:`Limits.admit` -- so the SSE endpoint (streamed or not), the
WebSocket, gRPC, and any dialect added later (``/v1/messages``,
``/v1/responses``) get the same limits without a line of their own.  Each
refusal is an :class:`~refimpl.patterns.errors.APIError`: an HTTP status and
the OpenAI error shape, an ``error`` message on a WebSocket, a gRPC status.

==========================  ======  =============  =========================
limit (``Config``)          status  ``param``      ``code``
==========================  ======  =============  =========================
``max_messages``            400     messages       too_many_messages
``max_prompt_chars``        400     messages       prompt_too_long
``max_tokens_limit``        400     max_tokens     max_tokens_too_large
``max_streams_per_client``  429     (none)         too_many_streams
==========================  ======  =============  =========================

(``max_streams_per_client`` 0: no cap.)

The other limits live where their bytes are: the body size (413) is Quart's
``MAX_CONTENT_LENGTH``, checked as the body arrives, chunked or not; the
WebSocket message size (close 1009) is the watchdog's, below ASGI
(``hypercorn_patches.py``).

**max_tokens and the simulated length.**  The ceiling bounds what a client
may *ask* for.  A request that asks for more (``max_tokens`` or
``max_completion_tokens``) is refused, not quietly shortened: a client that
asked for 100,000 tokens and got 32,768 with ``finish_reason: "length"``
would think the model ran out, not the server's patience.  A request that
asks for nothing gets what the model gives.  The simulated model's own
length, ``simulate.tokens``, is that: how long the model "wants" to talk,
not a request for tokens, and the lessons and tests make it huge (a million)
to have a stream that runs until cancelled; it is not bounded here.  What
bounds a generation that runs on, simulated or real, is
``--generation-timeout``.

**Streams per client address.**  The engine's ``--max-active`` /
``--max-queue`` protect the model from everyone together; this protects
everyone from one client that opens stream after stream.  The address is
the TCP peer's (the ASGI scope's ``client``), remembered for each request
by :func:`remember_client` in front of every protocol.  ``X-Forwarded-For``
is *not* trusted: any client can write any address there and get a fresh
allowance per request.  Behind a reverse proxy every client has the proxy's
address, so raise the limit there or let the proxy enforce it (nginx
``limit_conn``).  A slot frees the moment its generation ends, however it
ends (done, error, cancelled, the client gone): the count is of this
client's generations whose trace is not finished, read at each admission,
so there is no release call for any path to forget.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .patterns.errors import APIError

if TYPE_CHECKING:
    from .backend import ModelRequest
    from .config import Config
    from .engine import Generation

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

#: The TCP peer address of the request being handled (None: not over a socket).
CLIENT_ADDRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("refimpl_client", default=None)


def remember_client(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: note each request's peer address for :class:`Limits`
    (the tasks that serve the request inherit the context)."""

    async def remembering(scope: dict, receive: Callable, send: Callable) -> None:
        client = scope.get("client")
        token = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            await app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(token)

    return remembering


def _too_large(message: str, param: str, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


# region: limits
class Limits:
    def __init__(self, config: Config, retry_after: float = 1.0) -> None:
        self.config = config
        self.retry_after = retry_after
        self._by_client: dict[str, list[Generation]] = {}
        self._sweep_at = 64  # forget finished clients when this many are known

    def admit(self, request: ModelRequest) -> str | None:
        """Check ``request`` before it starts; raises :class:`APIError`.
        Returns the client address to :meth:`track` the generation under."""
        self.check_request(request)
        client, limit = CLIENT_ADDRESS.get(), self.config.max_streams_per_client
        if limit <= 0:  # 0: no cap (a load test from one address; a proxy that limits)
            return None
        if client is not None:
            running = self._running(client)
            if len(running) >= limit:
                raise APIError(
                    429,
                    f"Too many streams from your address: {len(running)} running"
                    f" (limit {limit}); wait for one to end.",
                    code="too_many_streams",
                    retry_after=self.retry_after,
                )
        return client

    def check_request(self, request: ModelRequest) -> None:
        c = self.config
        if len(request.messages) > c.max_messages:
            raise _too_large(
                f"Too many messages: {len(request.messages)} (limit {c.max_messages}).",
                "messages",
                "too_many_messages",
            )
        chars = sum(len(content) for _, content in request.messages)
        if chars > c.max_prompt_chars:
            raise _too_large(
                f"The prompt is too long: {chars} characters (limit {c.max_prompt_chars}).",
                "messages",
                "prompt_too_long",
            )
        ceiling = c.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > ceiling:
            raise _too_large(
                f"max_tokens is too large: {request.max_tokens} (limit {ceiling}).",
                "max_tokens",
                "max_tokens_too_large",
            )

    def track(self, client: str | None, gen: Generation) -> None:
        """Count ``gen`` against ``client`` until it ends."""
        if client is None:
            return
        self._by_client.setdefault(client, []).append(gen)
        if len(self._by_client) > self._sweep_at:
            for known in list(self._by_client):
                self._running(known)
            self._sweep_at = 2 * len(self._by_client) + 64

    def _running(self, client: str) -> list[Generation]:
        """This client's generations that have not ended (the ended ones are
        dropped here: their slots are free)."""
        running = [g for g in self._by_client.get(client, ()) if not g.finished]
        if running:
            self._by_client[client] = running
        else:
            self._by_client.pop(client, None)
        return running


# endregion: limits
