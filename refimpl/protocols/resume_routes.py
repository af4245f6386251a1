"""The HTTP side of resumable streams (lesson 11; the log is ``patterns/resume.py``).

Strategy
--------
Three routes, shaped so that a browser's ``EventSource`` needs nothing but
the URL (WHATWG HTML §9.2):

``POST /v1/chat/completions`` with ``"stream": true, "resumable": true``
    Starts the producer task and answers as the first reader of the log:
    the same OpenAI chunks as an ordinary stream, each event with an
    ``id:``.  ``X-Request-Id`` (and every chunk's ``id``) name the
    generation; its ``Location`` header is the URL to resume at.

``GET /v1/chat/completions/{id}/events``
    The events after ``Last-Event-ID`` (the header EventSource sends when it
    reconnects; ``?last_event_id=`` for a client that cannot set headers,
    the header wins), then the live ones, to ``[DONE]`` or the error event.
    No ``Last-Event-ID``: from the first event.  A body-less GET, so
    ``new EventSource(url)`` can open it.  When the client already has the
    last event, the answer is **204 No Content**: the spec's way to tell
    EventSource to stop reconnecting (without it, EventSource reconnects
    after every end of stream, for ever).  An unknown or expired id is a
    404 in the OpenAI error shape.

``POST /v1/chat/completions/{id}/cancel``
    Stops the generation wherever it runs (``client_cancel``) and answers
    with how it ended: ``completed``, ``failed``, ``cancelled``, or
    ``cancelling`` if the process that runs it did not confirm within a few
    seconds.  Cancelling one that already ended changes nothing (it is safe
    to retry).  It works for any running generation on this process, and
    for resumable ones on any process sharing the store.
"""

from __future__ import annotations

import trio
from quart import Quart, Response, request

from ..engine import Engine, Generation
from ..patterns import resume
from ..patterns.errors import APIError
from . import sse_chat
from .chat_request import ChatParams
from .http_json import json_response

#: How long POST .../cancel waits for another process to confirm.
CANCEL_WAIT = 5.0


def store(app: Quart) -> resume.Store:
    return app.extensions["refimpl.resume"]


# region: resumable-post
def start(app: Quart, gen: Generation, params: ChatParams, headers: dict[str, str]) -> Response:
    """The resumable branch of ``POST /v1/chat/completions``."""
    config = app.config["REFIMPL"]
    log = store(app).create(gen)
    gen.resumable = True
    framer = sse_chat.ChunkFramer(gen, params.include_usage)
    app.nursery.start_soon(resume.produce, gen, log, framer, store(app), config)
    body = resume.follow(log, 0, config.heartbeat)
    headers = headers | {"Location": f"/v1/chat/completions/{gen.id}/events"}
    # A stalled reader is dropped like any other (lesson 10); the generation
    # runs on for --resume-grace seconds, waiting for a resume.
    return sse_chat.event_stream(body, headers, config, on_drop=None)


# endregion: resumable-post


# region: last-event-id
def last_event_id() -> int:
    """``Last-Event-ID`` (or ``?last_event_id=``): the id of the last event
    the client has; 0 if it has none."""
    value = request.headers.get("Last-Event-ID", request.args.get("last_event_id", ""))
    if value == "":
        return 0
    if not value.isascii() or not value.isdigit():
        raise APIError(
            400,
            f"Last-Event-ID must be the id of an event of this stream (a number), not {value!r}.",
            param="Last-Event-ID",
            code="invalid_value",
        )
    return int(value)


# endregion: last-event-id


def unknown(gen_id: str, engine: Engine) -> APIError:
    gen = engine.get(gen_id)
    if gen is not None and not gen.resumable:
        why = 'it was not requested with "resumable": true'
    else:
        why = "no such generation, or it ended more than --resume-window seconds ago"
    return APIError(404, f"Generation '{gen_id}' cannot be resumed: {why}.", code="not_found")


def status_of(log: resume.ReplayLog | None, gen: Generation | None) -> str:
    """How a generation ended, as POST .../cancel reports it."""
    if gen is not None:
        name = gen.trace.events[-1].name
        return {"done": "completed", "error": "failed", "cancelled": "cancelled"}.get(name, "cancelling")
    if log is None or not log.ended:
        return "cancelling"
    last = log.entries[-1].wire if log.entries else b""
    if log.failure is None and last.endswith(b"data: [DONE]\n\n"):
        return "completed"
    return "cancelled" if b'"code":"client_' in last else "failed"


def register(app: Quart, engine: Engine) -> None:
    config = app.config["REFIMPL"]

    # region: resume-get
    @app.get("/v1/chat/completions/<gen_id>/events")
    async def events(gen_id: str) -> Response:
        after = last_event_id()
        log = await store(app).find(gen_id)
        if log is None:
            raise unknown(gen_id, engine)
        headers = {"X-Request-Id": gen_id}
        if log.ended and log.failure is None and after >= log.seq:
            return Response(b"", 204, headers)  # nothing more: EventSource stops here
        engine.metrics.resumes.labels(where="local" if log.gen is not None else "mirror").inc()
        body = resume.follow(log, after, config.heartbeat, first=resume.RETRY)
        return sse_chat.event_stream(body, headers, config, on_drop=None)

    # endregion: resume-get

    # region: resume-cancel
    @app.post("/v1/chat/completions/<gen_id>/cancel")
    async def cancel(gen_id: str) -> Response:
        gen = engine.get(gen_id)
        log = None
        if gen is not None:  # it runs (or ran) here: at once
            gen.cancel("client_cancel")
        else:  # elsewhere, perhaps: ask, then wait for its log to end
            log = await store(app).cancel_elsewhere(gen_id)
            if log is None:
                raise APIError(404, f"No generation with id '{gen_id}'.", code="not_found")
            with trio.move_on_after(CANCEL_WAIT):
                while not log.ended:
                    await log.changed(CANCEL_WAIT)
        body = {"id": gen_id, "object": "chat.completion.cancellation", "status": status_of(log, gen)}
        return json_response(body)

    # endregion: resume-cancel
