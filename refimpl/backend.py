"""What a model is, to the rest of the server: the types every backend shares.

Strategy
--------
A protocol module never talks to a model directly; it asks the engine for a
generation, and the engine asks a :class:`Backend` for a :class:`TokenStream`
(``model.py`` has the simulated one; ``upstream.py`` proxies a real
server).  This module holds only the shapes they exchange -- the request, the
simulation knobs, the failure -- and imports nothing that does I/O, so the
pure modules that validate requests and build messages (``chat_request.py``,
``ws_messages.py``) can use them and stay sans-IO, the way ``refimpl/sse/``
is (STYLE §1; ``tests/test_sse_parser.py`` checks the imports).

A :class:`TokenStream` has exactly two ways to get a token:

* ``await stream.next()`` waits for the next token (``None`` at the end).  It
  must be *cancel-safe*: if the await is cancelled (a heartbeat timer fired,
  the client went away) no token is lost and a later call carries on.
* ``stream.poll()`` returns a token only if one is ready *right now*, without
  waiting.  The engine drains ``poll()`` after each ``next()`` so that when
  the model is faster than the network, everything that is ready leaves in
  one write (lesson 02, "cost per token").

Either may raise :class:`ModelError` (an expected failure with an OpenAI error
code, lesson 07); anything else it raises is a bug, which the engine reports
as ``internal_error`` (``patterns/errors.py``).

A stream may also have a ``close()`` (plain, not async): the engine calls it
once the generation ends, however it ends, so a stream that holds something
open -- ``upstream.py``'s request to a real model -- lets go of it at once,
and a cancelled generation stops the real model too (lesson 14).

And it may have an ``async opened()``: it returns once the stream has
started (``upstream_stream.py``: the upstream answered 200) and raises the
:class:`ModelError` if it never will, so that a route can still answer
with a status line (``Generation.opened``, which bounds the wait).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

# A simulated tokenizer: every word (with the space before it) and every
# punctuation mark is one token.  Real tokenizers split differently, but the
# counts are stable, deterministic and easy to check by eye.
TOKEN_RE = re.compile(r"\s*[\w'’-]+|\s*[^\w\s]")


def count_tokens(text: str) -> int:
    """Number of simulated tokens in ``text`` (used for ``prompt_tokens``)."""
    return len(TOKEN_RE.findall(text))


@dataclass(frozen=True, slots=True)
class Simulate:
    """Timing and failure knobs for the simulated model (DESIGN §2)."""

    ttft_ms: float = 200.0
    itl_ms: float = 20.0
    tokens: int = 64
    fail_after_tokens: int | None = None
    fail_with: str = "model_error"
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What a backend needs to start one generation, protocol-independent."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    model: str = "refimpl-sim"
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    simulate: Simulate = field(default_factory=Simulate)
    temperature: float | None = None
    # The "simulate" object exactly as the client sent it (None: it sent
    # none), which a proxy passes on to its upstream (upstream.py).
    simulate_sent: dict[str, Any] | None = None

    @property
    def prompt(self) -> str:
        return "\n".join(content for _, content in self.messages)


class ModelNames(str):
    """The model a server serves by default -- the string itself, which is
    what a WebSocket turn (it names no model) asks for -- and ``others`` it
    also accepts.  ``refimpl serve --upstream`` serves every model the
    upstream lists (``upstream.py``); ``others`` is None while that list is
    unknown, and then any name goes on to the upstream, which judges it."""

    others: frozenset[str] | None

    def __new__(cls, default: str, others: Iterable[str] | None = ()) -> ModelNames:
        names = super().__new__(cls, default)
        names.others = None if others is None else frozenset(others)
        return names


def serves(served: str, model: str) -> bool:
    """Whether a server serving ``served`` (a name, or :class:`ModelNames`)
    accepts a request for ``model``."""
    if model == served or not isinstance(served, ModelNames):
        return model == served
    return served.others is None or model in served.others


class ModelError(Exception):
    """The model failed mid-generation; ``code`` names why (OpenAI error code)."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(message or f"The model failed while generating ({code}).")
        self.code = code
        self.message = str(self)


class Interrupted(Exception):
    """What a stream's ``next()`` raises when its ``interrupt()`` woke it
    early: the generation was cancelled while the stream slept (the engine's
    timer fast path, lesson 13).  Like a trio cancellation, it loses no token:
    calling ``next()`` again resumes the same wait."""


class TokenStream(Protocol):  # see the module docstring
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None  # "stop" | "length", set when next() returns None

    async def next(self) -> str | None: ...

    def poll(self) -> str | None: ...


class Backend(Protocol):
    def start(self, request: ModelRequest) -> TokenStream: ...
