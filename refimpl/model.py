"""The simulated model: the embedded default backend.

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
``fail_after_tokens`` / ``fail_with``   fail after that many tokens with that
              error code, or ``crash``: raise a plain exception, a bug (lesson 07)
``seed``      picks the text

The shapes a backend exchanges with the engine (:class:`Backend`,
:class:`TokenStream` with its cancel-safe ``next()`` and non-blocking
``poll()``, :class:`ModelRequest`, :class:`ModelError`) live in
``backend.py``, which does no I/O; they are re-exported here.

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

import trio

from .backend import (  # re-exported: the types every backend shares
    TOKEN_RE,
    Backend,
    ModelError,
    ModelRequest,
    Simulate,
    TokenStream,
    count_tokens,
)
from .simclock import SharedClock

__all__ = [
    "Backend",
    "ModelError",
    "ModelRequest",
    "Simulate",
    "SimulatedModel",
    "TokenStream",
    "count_tokens",
    "simulated_text",
    "simulated_token",
]

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
    # The tokens of the eight sentences joined by spaces, from the corpus's
    # tokens worked out once (this runs at every request's start).
    first, *rest = (rng.randrange(len(_CORPUS)) for _ in range(8))
    return [*_TOKENS[first], *(t for i in rest for t in _SPACED_TOKENS[i])]


# Each sentence's tokens, and the same after a space (the space goes with the
# first token, as TOKEN_RE splits the joined text).
_TOKENS = [TOKEN_RE.findall(sentence) for sentence in _CORPUS]
_SPACED_TOKENS = [TOKEN_RE.findall(" " + sentence) for sentence in _CORPUS]


def simulated_token(text: list[str], n: int) -> str:
    """Token ``n`` of an answer that cycles through ``text``: where the text
    starts over, its first word gets a space, so sentences never glue
    together ("at once. If", not "at once.If")."""
    token = text[n % len(text)]
    return " " + token if n >= len(text) and n % len(text) == 0 else token


class _SimulatedStream:
    """One simulated generation: a cursor over pre-computed tokens and deadlines."""

    def __init__(self, request: ModelRequest, clock: SharedClock) -> None:
        sim = request.simulate
        self._clock = clock
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
        self.stop_sequence: str | None = None  # the one that ended it, if any
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

    # The engine's timer fast path (simclock.py, lesson 13).
    def due(self) -> float | None:
        """When ``next()`` will have the next token, if all it waits for is
        the shared clock; None: it cannot say."""
        if not self._clock.attached or self.finish_reason is not None or self._out_of_tokens():
            return None
        return self._due

    def interrupt(self, task: trio.lowlevel.Task) -> bool:
        """Wake ``task``, asleep in ``next()``, with Interrupted."""
        return self._clock.interrupt(task)

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
            if self._fail_with == "crash":  # a bug, not a failure it reports
                raise RuntimeError(f"simulated crash after {n} tokens")
            raise ModelError(self._fail_with)
        if self._max is not None and n >= self._max:
            self.finish_reason = "length"
            return None
        if n >= self._want:
            self.finish_reason = "stop"
            return None
        token = simulated_token(self._text, n)
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
        hits = [(i, s) for s in self._stop if (i := text.find(s)) != -1]
        if not hits:
            self._emitted = text
            return token
        self.finish_reason = "stop"
        at, self.stop_sequence = min(hits, key=lambda hit: hit[0])  # the first in the text
        head = text[len(self._emitted) : at]
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
