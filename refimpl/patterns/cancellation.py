"""Cancellation: notice that the client is gone, and stop the model at once.

Strategy
--------
A model that keeps generating for a client who left is the most expensive
bug in a streaming server: every token costs GPU time, and nobody reads it.
The cure has two halves, and this module is the one home of both for every
protocol (lesson 09):

**Noticing.**  Each protocol learns of a departure its own way, and each way
ends in the writer's ``finally`` or in a callback, never in a poll:

* SSE: the client closes the connection; hypercorn tells Quart, Quart
  cancels the response's body generator (a ``Cancelled`` at its next
  checkpoint, or ``GeneratorExit`` at a ``yield``).  A client that stops
  reading without closing is noticed by the watchdog's stall guard
  (``--stall-timeout``, ``hypercorn_patches.py``), which drops it.
* WebSocket: a close frame or a vanished peer (the watchdog's ping timeout),
  or a ``{"type": "cancel"}`` message, which cancels without a disconnect.
* Non-streamed HTTP: the same as SSE; the handler is cancelled.
* gRPC (its own issue): the call's cancellation or its deadline.

The engine helps the writer notice at all: ``Generation.pull`` passes a
checkpoint at least every ``YIELD_EVERY`` writes even when the model is
ahead, which is where a cancel is delivered.  A queued request is noticed
the same way: it waits inside its first ``pull()``.

**Stopping.**  :func:`client_left` cancels the generation with the reason,
which stops the model at once (``Generation.cancel`` cancels the scope the
model waits in), frees its slot for the next queued request, and writes
``cancelled(reason)`` into the trace and ``refimpl_cancellations_total``.
The reasons, each recorded exactly once per generation:

=====================  ==================================================
``client_disconnect``  the client closed the connection (any protocol)
``client_cancel``      a WebSocket ``cancel`` message
``stall_timeout``      a write waited ``--stall-timeout``: not reading
``ping_timeout``       a WebSocket peer answered no ping: half-open
``message_too_big``    a WebSocket message over the limit (close 1009)
``protocol_error``     a WebSocket binary frame (close 1003)
``internal_error``     a bug in the WebSocket reader (close 1011)
``shutdown``           the server's drain ran out (``shutdown.py``)
=====================  ==================================================

A generation that already ended (``done``, ``error``) is never recorded as
cancelled: a client that hangs up just after the last byte did not cut
anything short.  ``examples/zombie.py`` is the broken version: the model in
a task of its own that nobody cancels; ``refimpl bench cancel`` measures
how fast ours stops (lesson 09).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine import Generation


# region: client-left
def client_left(gen: Generation, reason: str | None = None) -> None:
    """From a writer's ``finally`` (or a watchdog's callback): if the
    generation is still running, its client is gone, so stop the model now.
    ``reason`` is what the protocol knows of why; by default the client
    simply disconnected."""
    if not gen.finished:
        gen.cancel(reason or "client_disconnect")


# endregion: client-left
