"""The model side of a stream: a ``Backend`` protocol and the simulated model.

Strategy
--------
Everything this project teaches happens *between* a model that emits tokens
and a client that reads them.  To study that gap we need a model whose timing
we control exactly, so the default backend is :class:`SimulatedModel`: it
writes deterministic, readable English (the same prompt and seed always give
the same tokens) and its timing comes from knobs that ride in each request's
``"simulate"`` object (DESIGN §2):

``ttft_ms``   delay before the first token (prefill, queueing)
``itl_ms``    delay between tokens (decode step)
``tokens``    how many tokens it wants to write before it stops on its own
``fail_after_tokens`` / ``fail_with``   raise :class:`ModelError` with that
              code after that many tokens (lesson 07, mid-stream errors)
``seed``      picks the text

A backend hands out a :class:`TokenStream` per generation, which has exactly
two ways to get a token:

* ``await stream.next()`` waits for the next token (``None`` at the end).  It
  must be *cancel-safe*: if the await is cancelled (a heartbeat timer fired,
  the client went away) no token is lost and a later call carries on.
* ``stream.poll()`` returns a token only if one is ready *right now*, without
  waiting.  The SSE writer drains ``poll()`` after each ``next()`` so that
  when the model is faster than the network, everything that is ready leaves
  in one write (lesson 02, "cost per token").

The simulated model sleeps on absolute deadlines (``trio.sleep_until``, or the
app's :class:`~refimpl.simclock.SharedClock`, which does the same for every
stream with one timer), which is what makes ``next()`` cancel-safe: sleeping
again until the same deadline simply resumes the wait.  A token becomes due
``itl_ms`` after the previous one was *taken*, so a reader that stops pulling
stops the model too: that is backpressure's "pause" policy for free (lesson 10).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .simclock import SharedClock

# A simulated tokenizer: every word (with the space before it) and every
# punctuation mark is one token.  Real tokenizers split differently, but the
# counts are stable, deterministic and easy to check by eye.
_TOKEN = re.compile(r"\s*[\w'’-]+|\s*[^\w\s]")


def count_tokens(text: str) -> int:
    """Number of simulated tokens in ``text`` (used for ``prompt_tokens``)."""
    return len(_TOKEN.findall(text))


# The simulated model writes sentences from this small corpus, chosen by a
# seeded RNG.  They are about streaming so that the demo reads sensibly.
_CORPUS = (
    "Streaming sends each token to the reader as soon as the model writes it.",
    "The first token arrives long before the whole answer is ready.",
    "Time to first token is what a person feels as speed.",
    "A server-sent event is a few lines of text followed by a blank line.",
    "When the reader is slow, the writer should slow down instead of buffering.",
    "A comment line keeps a quiet connection alive through a proxy.",
    "If the client hangs up, the generation should stop at once.",
    "An error in the middle of a stream is sent as an event, then the stream ends.",
    "WebSockets carry messages both ways over one connection.",
    "HTTP/2 multiplexes many streams over a single connection.",
    "Every chunk of the stream carries the same id and model.",
    "Usage counts the prompt tokens and the completion tokens.",
)


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

    @property
    def prompt(self) -> str:
        return "\n".join(content for _, content in self.messages)


class ModelError(Exception):
    """The model failed mid-generation; ``code`` names why (OpenAI error code)."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(message or f"The model failed while generating ({code}).")
        self.code = code
        self.message = str(self)


class TokenStream(Protocol):
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None  # "stop" | "length", set when next() returns None

    async def next(self) -> str | None: ...

    def poll(self) -> str | None: ...


class Backend(Protocol):
    def start(self, request: ModelRequest) -> TokenStream: ...


def simulated_text(prompt: str, seed: int) -> list[str]:
    """The full list of tokens the simulated model can write for this prompt.

    Deterministic: the RNG is seeded from a hash of (prompt, seed), never from
    Python's randomised ``hash()``.  Long enough for any realistic ``tokens``
    knob; the stream simply stops at ``tokens``.
    """
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which strict
    # UTF-8 refuses to encode; the hash only needs *some* stable bytes.
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8", "surrogatepass")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return _TOKEN.findall(" ".join(rng.choice(_CORPUS) for _ in range(8)))


class _SimulatedStream:
    """One simulated generation: a cursor over pre-computed tokens and deadlines."""

    def __init__(self, request: ModelRequest, clock: SharedClock) -> None:
        sim = request.simulate
        self._sleep_until = clock.sleep_until
        seed = sim.seed if sim.seed is not None else (request.seed or 0)
        self._text = simulated_text(request.prompt, seed)
        self._want = sim.tokens
        self._max = request.max_tokens
        self._fail_after = sim.fail_after_tokens
        self._fail_with = sim.fail_with
        self._itl = sim.itl_ms / 1000
        self._stop = request.stop
        self._emitted = ""  # text so far, only kept when stop sequences exist
        self.prompt_tokens = count_tokens(request.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        # The first token is due ttft_ms from now; each later one itl_ms
        # after its predecessor was taken (see the module docstring).
        self._due = trio.current_time() + sim.ttft_ms / 1000

    # region: model-step
    async def next(self) -> str | None:
        if self.finish_reason is None and not self._out_of_tokens():
            await self._sleep_until(self._due)  # cancel-safe: same deadline on retry
        return self._take()

    def poll(self) -> str | None:
        if self.finish_reason is not None:
            return None
        if self._due > trio.current_time() and not self._out_of_tokens():
            return None
        return self._take()
    # endregion: model-step

    def _out_of_tokens(self) -> bool:
        """The model knows it is finished without another decode step."""
        n = self.completion_tokens
        return n >= self._want or (self._max is not None and n >= self._max)

    def _take(self) -> str | None:
        if self.finish_reason is not None:
            return None
        n = self.completion_tokens
        if self._fail_after is not None and n >= self._fail_after:
            self.finish_reason = "error"
            raise ModelError(self._fail_with)
        if self._max is not None and n >= self._max:
            self.finish_reason = "length"
            return None
        if n >= self._want:
            self.finish_reason = "stop"
            return None
        token = self._text[n % len(self._text)]
        if self._stop:
            token = self._apply_stop(token)
            if token is None:
                return None
        self.completion_tokens = n + 1
        # region: model-due
        # The next token is due itl after this one was *taken*, so a reader
        # that stops pulling pauses the model (at itl 0 it is due at once).
        self._due = (trio.current_time() if self._itl else self._due) + self._itl
        # endregion: model-due
        return token

    def _apply_stop(self, token: str) -> str | None:
        """End before a stop sequence, the way OpenAI does: the text up to the
        stop is sent, the stop sequence itself and everything after are not."""
        text = self._emitted + token
        hits = [i for s in self._stop if (i := text.find(s)) != -1]
        if not hits:
            self._emitted = text
            return token
        self.finish_reason = "stop"
        head = text[len(self._emitted) : min(hits)]
        return head or None


class SimulatedModel:
    """The embedded default backend: no weights, exact timing, readable text.

    Its streams sleep on a :class:`~refimpl.simclock.SharedClock`: plain
    ``trio.sleep_until`` until the app attaches the clock to its lifespan
    nursery, then one shared timer for all streams (lesson 13).
    """

    def __init__(self, clock: SharedClock | None = None) -> None:
        self.clock = clock or SharedClock()

    def start(self, request: ModelRequest) -> TokenStream:
        return _SimulatedStream(request, self.clock)
