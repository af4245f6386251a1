"""Exercise 10, a solution: a queue that pushes back, and a writer that coalesces.

The task is in ``../exercise.py``.  The bounded channel is the whole of the
backpressure: ``send`` waits while ``ahead`` tokens are queued, so the model
waits for the client.  The writer takes one token (waiting for it), then
everything else already queued (not waiting), and writes them as one list.
The nursery ties the two together: an error in either cancels the other.
This is ``refimpl/patterns/backpressure.py``'s ``Coalesce`` in a dozen lines,
without its trace events; ``pause``, refimpl's default, has no producer
task at all: the writer pulls the model itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import trio


async def relay(model: AsyncIterator[str], write: Callable[[list[str]], Awaitable[None]], ahead: int) -> None:
    send, receive = trio.open_memory_channel[str](ahead)  # full at `ahead`: send() waits

    async def produce() -> None:
        async with send:
            async for token in model:
                await send.send(token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async for token in receive:  # waits for the first token...
            batch = [token]
            while True:  # ...then takes whatever else is there, without waiting
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await write(batch)
