"""Exercise 09, a solution: stop the model when the client leaves.

The task is in ``../exercise.py``.  The model is stepped *inside* the
response (``gen.pull()``), so when the client leaves there is no other task
to stop: Quart's cancel (or ``GeneratorExit`` at a ``yield``) ends this
generator, and its ``finally`` tells the engine, which cancels the model
and frees the slot.  Without the ``finally`` the model would stand still
(nobody pulls) but the generation would never end: it would hold its slot
and its trace would never say ``cancelled``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from quart import Response
from quart_trio import QuartTrio

from refimpl.engine import FINISHED, Generation
from refimpl.patterns import cancellation
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
    try:
        while (tokens := await gen.pull()) is not FINISHED:  # the model steps here, or not at all
            for token in tokens:
                yield chunk(gen, {"content": token})
        yield chunk(gen, {}, gen.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        cancellation.client_left(gen)  # still running? then the client left: stop the model
