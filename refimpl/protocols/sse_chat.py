"""``POST /v1/chat/completions``: OpenAI-compatible streaming over SSE.

Strategy
--------
The wire format is OpenAI's Chat Completions streaming, which is Server-Sent
Events (WHATWG HTML §9.2) carrying one JSON ``chat.completion.chunk`` per
``data:`` line:

1. a first chunk whose delta is ``{"role": "assistant", "content": ""}``;
2. one chunk per piece of content, ``delta: {"content": "..."}``;
3. a final chunk with an empty delta and the ``finish_reason``;
4. if the request asked ``stream_options.include_usage``, a usage chunk with
   ``choices: []`` (and ``"usage": null`` on every chunk before it);
5. the sentinel line ``data: [DONE]``.

Every chunk has the same ``id``, ``created`` and ``model``.  The response
headers switch off the buffering that would hide the stream: ``Cache-Control:
no-cache`` for caches, ``X-Accel-Buffering: no`` for nginx, and on HTTP/1.1
``Connection: keep-alive`` (HTTP/2 forbids that header).  Quart's 60-second
``RESPONSE_TIMEOUT`` would silently cut long streams, so it is switched off
for this response (DESIGN §4).

The error cases are not handled here but in ``patterns/``, where each one's
SSE and WebSocket handling stand side by side: a failure after the 200 left
travels *in* the stream as ``event: error`` and the body ends without
``[DONE]`` (``patterns/errors.py``, lesson 07); a silence of ``--heartbeat``
seconds sends a ``: ping`` comment (``patterns/heartbeat.py``, lesson 08);
a client that reads slower than the model writes meets the request's
backpressure policy (``patterns/backpressure.py``, lesson 10).
The writer below has the same pull loop as the WebSocket's
(``websocket_chat.py``), so the two read side by side.

One writer, three dialects.  ``anthropic_messages.py`` (Anthropic's
Messages) and ``openai_responses.py`` (OpenAI's Responses) stream the same
generations in other words, and only the words differ: so :class:`Framer`
names the five moments of a stream whose bytes a dialect decides (its
start, a batch of tokens, a heartbeat, its end, a failure), and
:func:`stream_chunks`, :func:`stream_response` and :func:`collect` serve
all three dialects, each a framer and a route (lesson 14).  A framer
returns ready bytes, so the loop adds no work per token.

Cost per token.  This is the hot path, so it is built for the costs measured
in DESIGN §4 (lesson 02, "cost per token"): the chunk JSON is *pre-encoded*
once per request into a prefix and a suffix around the content, so a token
costs one C-level string escape and two concatenations, not a ``json.dumps``
of a nested dict; the model step and the framing run in the one generator
that Quart iterates (no hand-off between tasks); and every token that is
already available leaves in one write (``Generation.pull``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from json.encoder import encode_basestring as json_string
from typing import Any, Protocol

from quart import Quart, Response, request

from .. import hypercorn_patches
from ..backend import ModelError
from ..config import Config
from ..engine import FINISHED, SILENT, Engine, Generation, GenerationCancelled
from ..jsonwire import dumps
from ..patterns import backpressure, cancellation, errors, heartbeat
from ..sse import encode
from . import resume_routes
from .chat_request import parse_chat_request
from .http_json import json_response, read_json_body

SYSTEM_FINGERPRINT = "fp_refimpl"
_MARK = "\x00CONTENT\x00"  # placeholder that cannot occur in JSON output


class Framer(Protocol):
    """The bytes of one stream, in one dialect: what the writer sends at
    each moment.  Every method returns one write, already SSE-framed; the
    writer calls ``start``, then ``content`` and ``heartbeat`` as the model
    goes, then ``end`` -- or ``error``, after which the body ends."""

    def start(self) -> bytes: ...  # before the first token is waited for

    def content(self, tokens: list[str]) -> bytes: ...  # the hot path

    def heartbeat(self) -> bytes: ...  # pull() said SILENT (lesson 08)

    def end(self) -> bytes: ...  # pull() said FINISHED

    def error(self, err: ModelError) -> bytes: ...  # a failure after the 200 (lesson 07)


# region: chunk-framer
class ChunkFramer:
    """Builds the SSE bytes of one stream's chunks, pre-encoded per request."""

    def __init__(self, gen: Generation, include_usage: bool) -> None:
        self.gen = gen
        self.include_usage = include_usage
        self._base = {
            "id": gen.id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": gen.request.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [],
        }
        if include_usage:
            self._base["usage"] = None
        # The template is written once and split around a marker, so each
        # token is just prefix + JSON-escaped text + suffix: as a bare JSON
        # string (a resumable stream's log, patterns/resume.py) and framed
        # as an SSE event.
        template = dumps(self._chunk({"content": _MARK}, None))
        self._json = template.split(json_string(_MARK))
        self._prefix, self._suffix = encode(template).decode().split(json_string(_MARK))

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base, "choices": [choice]}

    def content(self, tokens: list[str]) -> bytes:
        p, s = self._prefix, self._suffix
        return "".join([p + json_string(t) + s for t in tokens]).encode()

    def content_json(self, token: str) -> str:
        return self._json[0] + json_string(token) + self._json[1]

    def role_json(self) -> str:
        return dumps(self._chunk({"role": "assistant", "content": ""}, None))

    def start(self) -> bytes:
        return encode(self.role_json())

    def end_json(self) -> list[str]:
        """The data of the final chunk, the usage chunk if asked for, ``[DONE]``."""
        out = [dumps(self._chunk({}, self.gen.finish_reason))]
        if self.include_usage:
            out.append(dumps({**self._base, "usage": self.gen.usage()}))
        return [*out, "[DONE]"]

    def end(self) -> bytes:
        """The ending as one write."""
        return b"".join(encode(data) for data in self.end_json())

    def heartbeat(self) -> bytes:
        return heartbeat.sse_heartbeat(self.gen)  # a comment, ": ping"

    def error(self, err: ModelError) -> bytes:
        return errors.sse_error_event(err)  # an error event, then no [DONE]


# endregion: chunk-framer


# region: sse-stream
async def stream_chunks(
    gen: Generation, flow: backpressure.Flow, framer: Framer, config: Config
) -> AsyncIterator[bytes]:
    """The response body, in any dialect: Quart iterates this and writes each item."""
    batch, silence = config.batch_tokens, config.heartbeat
    try:
        yield framer.start()
        # A blocked yield pauses the model, or not: the policy's (lesson 10).
        while (step := await flow.pull(batch, timeout=silence)) is not FINISHED:
            if step is SILENT:
                yield framer.heartbeat()  # lesson 08
            else:
                yield framer.content(step)
        yield framer.end()
    except ModelError as err:  # lesson 07 (and a slow_consumer): an error event, no [DONE]
        yield framer.error(err)
    except GenerationCancelled as cancel:  # the server cancelled it (cancel_all)
        yield framer.error(errors.cancelled_error(cancel.reason))
    except Exception as bug:  # a bug of ours: an error event, not a cut body
        yield framer.error(gen.fail(bug))
    finally:
        # Still running: we are leaving early, so the client went away (lesson
        # 09).  A client the stall guard dropped was cancelled already, with
        # its reason, by the watchdog's on_drop.
        cancellation.client_left(gen)
        flow.close()


# endregion: sse-stream


def register(app: Quart, engine: Engine) -> None:
    config = app.config["REFIMPL"]

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        params = parse_chat_request(
            await read_json_body(), served_model=config.model_name, defaults=config.simulate
        )
        if params.resumable:  # its log must fit before the model starts
            resume_routes.store(app).registry.make_room()
        gen = engine.start(params.model_request, "sse" if params.stream else "http")
        headers = {"X-Request-Id": gen.id}
        if not params.stream:
            return await complete(gen, headers, config)
        if params.resumable:  # lesson 11: a producer task and a log
            await gen.opened(config.heartbeat, headers)  # as in stream_response
            return resume_routes.start(app, gen, params, headers)
        framer = ChunkFramer(gen, params.include_usage)
        return await stream_response(app, gen, framer, params.backpressure, headers)


# region: sse-response
async def stream_response(
    app: Quart, gen: Generation, framer: Framer, policy: str | None, headers: dict[str, str]
) -> Response:
    """A streamed answer in any dialect: ``framer``'s bytes, written by
    :func:`stream_chunks` under the request's backpressure ``policy``."""
    config = app.config["REFIMPL"]
    # A model that cannot start at all (an upstream that refuses us, lesson
    # 14) still gets a status line of its own, not a 200 and an error event;
    # the wait is at most one heartbeat interval, then the stream starts.
    await gen.opened(config.heartbeat, headers)
    # coalesce's producer lives in the app's nursery: it must not be
    # held open across the body generator's yields (DESIGN §4).
    flow = backpressure.flow(gen, policy, config, app.nursery)
    body = stream_chunks(gen, flow, framer, config)
    # A client that reads nothing for stall_timeout seconds is dropped
    # and its generation cancelled at once (lesson 10).
    return event_stream(body, headers, config, on_drop=partial(cancellation.client_left, gen))


# endregion: sse-response


# region: event-stream
def event_stream(
    body: AsyncIterator[bytes], headers: dict[str, str], config: Config, on_drop: Callable | None
) -> Response:
    """A ``text/event-stream`` response with the headers that keep every hop
    from buffering it, and the stall guard under it."""
    headers = headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.http_version == "1.1":
        headers["Connection"] = "keep-alive"
    # hypercorn's stream finds the watchdog in the scope when the response
    # starts: a write that waits stall_timeout seconds drops the client.
    watchdog = hypercorn_patches.Watchdog(ping_interval=None, stall_timeout=config.stall_timeout)
    watchdog.on_drop = on_drop
    request.scope[hypercorn_patches.SCOPE_KEY] = watchdog
    response = Response(body, 200, headers, content_type="text/event-stream; charset=utf-8")
    response.timeout = None  # Quart would cut the stream at 60 s
    return response


# endregion: event-stream


# region: complete
async def collect(gen: Generation, headers: dict[str, str], config: Config) -> str:
    """Non-streaming, any dialect: the same generation, pulled to its end
    with the same exceptions as the stream, into one text."""
    parts: list[str] = []
    try:
        while (step := await gen.pull()) is not FINISHED:
            parts += step
    except ModelError as err:  # the status line is still ours: say it there
        raise errors.failure_status(err, config.retry_after, headers) from None
    except GenerationCancelled as cancel:  # the server cancelled it (cancel_all)
        raise errors.failure_status(
            errors.cancelled_error(cancel.reason), config.retry_after, headers
        ) from None
    finally:
        cancellation.client_left(gen)  # still running: the client went away
    return "".join(parts)


async def complete(gen: Generation, headers: dict[str, str], config: Config) -> Response:
    """Chat Completions' answer not streamed: one ``chat.completion`` object."""
    message = {"role": "assistant", "content": await collect(gen, headers, config), "refusal": None}
    body = {
        "id": gen.id,
        "object": "chat.completion",
        "created": gen.created,
        "model": gen.request.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}],
        "usage": gen.usage(),
    }
    return json_response(body, 200, headers)


# endregion: complete
