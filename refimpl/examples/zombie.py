"""The seed's SSE loop with the model in a task of its own.  Broken: a zombie.

The seed article's ``stream_response`` reads the model's tokens and yields
one ``data:`` line per token, then a final chunk and ``data: [DONE]``.
Many tutorials go one step further and run the model in a *background task*
that puts each token into a queue, so that "the model never waits for the
network"; the response generator only reads the queue.  On asyncio that is
``asyncio.create_task(producer(queue))`` with an ``asyncio.Queue()``; on
Quart-Trio it is :meth:`~quart_trio.QuartTrio.add_background_task`, which
starts the task in the app's lifespan nursery, and an unbounded trio
memory channel.  This module is that shape, rebuilt minimally on our server
(streaming only, like the part of the seed it copies), with our engine
underneath so that the trace shows what the model did.

What it gets wrong, proved by ``tests/test_zombie.py``: **when the client
leaves, nothing stops the model.**  Quart-Trio hears the disconnect and
cancels the response generator, which is waiting on the queue; but the
producer lives in another nursery, so the cancel never reaches it.  It
goes on pulling tokens into a queue that nobody will ever read, until the
model finishes: the trace ends ``done``, not ``cancelled``, with every
token of the answer, most of them written after the client had gone.
With a real backend that is GPU time spent for nobody, and the generation
holds its slot (``max_active``) for the whole time.  The queue hides it, too:
being unbounded, it never pushes back, so the producer never notices that
its reader stopped (backpressure, lesson 10).

The fixed half is our own endpoint, ``protocols/sse_chat.py``: the model is
stepped *inside* the response generator (``Generation.pull``), so the cancel
that ends the generator is the one that stops the model, and its ``finally``
records ``cancelled(client_disconnect)``.  Lesson 09 ("Cancellation") puts
the two side by side.

Nothing in ``refimpl`` imports this module; tests and lesson 09 do.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import trio
from quart import Quart, Response

from ..engine import FINISHED, Generation
from ..protocols.chat_request import parse_chat_request
from ..protocols.http_json import read_json_body

PATH = "/broken/zombie/v1/chat/completions"  # an OpenAI base URL: {server}/broken/zombie/v1


def register(app: Quart) -> None:
    """Add the zombie route at :data:`PATH` to an app from ``create_app``."""
    engine = app.extensions["refimpl.engine"]
    config = app.config["REFIMPL"]

    @app.post(PATH)
    async def zombie_chat_completions() -> Response:
        params = parse_chat_request(
            await read_json_body(), served_model=config.model_name, defaults=config.simulate
        )
        gen = engine.start(params.model_request, "zombie")
        # The tutorial's queue: unbounded, so putting never waits.
        queue_in, queue_out = trio.open_memory_channel[str](math.inf)
        # The tutorial's asyncio.create_task(...): the model's own task, in
        # the app's nursery, which outlives this request.
        app.add_background_task(produce, gen, queue_in)
        response = Response(
            stream_response(gen, queue_out),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"},
        )
        response.timeout = None  # Quart's 60 s cut (lesson 02) is not this example's flaw
        return response


async def produce(gen: Generation, queue: trio.MemorySendChannel[str]) -> None:
    """The model's task: every token into the queue until the model is done.
    Closing the queue is the "end of answer" sentinel."""
    async with queue:
        while (tokens := await gen.pull()) is not FINISHED:
            for token in tokens:
                queue.send_nowait(token)  # never waits, never asks whether anyone reads


async def stream_response(gen: Generation, queue: trio.MemoryReceiveChannel[str]) -> AsyncIterator[str]:
    """The seed's ``stream_response``, reading the queue instead of the model.
    The client leaving cancels this generator, and only this generator."""
    async for token in queue:
        chunk = {
            "id": gen.id,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}],
        }
        yield f"data: {json.dumps(chunk)}\n\n"

    # Send final chunk
    final_chunk = {
        "id": gen.id,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}],
    }
    yield f"data: {json.dumps(final_chunk)}\n\n"
    yield "data: [DONE]\n\n"
