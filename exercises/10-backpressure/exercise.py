"""Exercise 10: a queue that pushes back, and a writer that coalesces (lesson 10).

``relay(model, write, ahead)`` moves tokens from a fast model to a slow
client: ``model`` is an async iterator of tokens, ``await write(tokens)``
sends a list of tokens to the client (and takes as long as the client
makes it).  Rewrite it so that

1. the model runs at most ``ahead`` tokens ahead of the writer: a model
   with that many tokens waiting must *wait* (plus the one it holds while
   it waits: ``ahead + 1`` made and not yet handed to ``write``);
2. each ``write`` gets *every* token waiting at that moment, as one list
   (lesson 10's ``coalesce``: one write instead of many);
3. a write never waits for more tokens than are there: with a fast client
   each token goes out the moment it is made;
4. ``relay`` returns when the model is finished and everything is written,
   and if ``write`` raises (the client left), ``relay`` raises that error (an
   ``ExceptionGroup`` around it is fine: that is what a nursery raises) and
   the model stops at once.

What is here now is lesson 10's "broken version", the zombie's queue: it
never pushes back, so a slow client lets the model run to the end into
memory, one write per token.  ``trio.open_memory_channel(n)`` makes a
queue that holds ``n`` items; ``receive_nowait()`` takes one without
waiting, or raises ``trio.WouldBlock``.  Run ``make exercise N=10``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable

import trio


async def relay(model: AsyncIterator[str], write: Callable[[list[str]], Awaitable[None]], ahead: int) -> None:
    send, receive = trio.open_memory_channel[str](math.inf)  # never full, so never pushes back

    async def produce() -> None:
        async with send:
            async for token in model:
                send.send_nowait(token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async for token in receive:
            await write([token])
