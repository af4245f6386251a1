"""Exercise 09: stop the model when the client leaves (lesson 09).

``register(app)`` adds a streaming chat route at :data:`PATH` to a refimpl
app; its body is ``stream_response(app, gen)``, which is lesson 09's
zombie (``refimpl/examples/zombie.py``): the model runs in a background task
that fills a queue, and the response only reads the queue.  When the client
leaves, Quart cancels the response, and nothing stops the model.

Rewrite ``stream_response`` so that the client leaving stops the model at
once: the trace must end ``cancelled(client_disconnect)``, with no token
made after the client left, and the slot must be free again.  Keep what it
sends the same: a chunk per token (``chunk``), a final chunk with the
finish reason, ``data: [DONE]``.  You need two things from refimpl:
``await gen.pull()`` (the tokens ready, else waits for some; ``FINISHED``
at the end) and ``cancellation.client_left(gen)``.  Lesson 09, "The broken
version" and "Stopping: one cancel scope", has both halves.

Leave ``register`` and ``chunk`` as they are.  Run ``make exercise N=09``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import trio
from quart import Response
from quart_trio import QuartTrio

from refimpl.engine import Generation
from refimpl.examples.zombie import produce
from refimpl.protocols.chat_request import parse_chat_request
from refimpl.protocols.http_json import read_json_body

PATH = "/exercise/v1/chat/completions"  # an OpenAI base URL: {server}/exercise/v1


def register(app: QuartTrio) -> None:
    engine, config = app.extensions["refimpl.engine"], app.config["REFIMPL"]

    @app.post(PATH)
    async def exercise_chat_completions() -> Response:
        body = await read_json_body()
        params = parse_chat_request(body, served_model=config.model_name, defaults=config.simulate)
        gen = engine.start(params.model_request, "exercise")
        response = Response(stream_response(app, gen), content_type="text/event-stream")
        response.timeout = None  # Quart's 60 s cut (lesson 02) is not this exercise
        return response


def chunk(gen: Generation, delta: dict[str, str], finish_reason: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return f"data: {json.dumps({'id': gen.id, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"


async def stream_response(app: QuartTrio, gen: Generation) -> AsyncIterator[str]:
    queue_in, queue_out = trio.open_memory_channel[str](math.inf)
    app.add_background_task(produce, gen, queue_in)  # the model, in a task of its own
    async for token in queue_out:
        yield chunk(gen, {"content": token})
    yield chunk(gen, {}, gen.finish_reason)
    yield "data: [DONE]\n\n"
