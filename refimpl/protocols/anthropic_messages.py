"""``POST /v1/messages``: the same generations, in Anthropic's Messages dialect.

Strategy
--------
Two vendors stream the same thing -- text, then why it stopped and what it
cost -- over the same transport, Server-Sent Events (WHATWG HTML §9.2), and
still no client of one can read the other.  This module is the second dialect
beside ``sse_chat.py`` (OpenAI's Chat Completions), built the same way so the
two read side by side (lesson 14).  It is only a framer that
pre-encodes one stream's events (an ``sse_chat.Framer``) and a route; the
pull loop, the response headers, the stall guard and ``patterns/`` are
``sse_chat``'s, shared.  Only the words on the wire change.

What Anthropic's streaming reference asks for, in our words: every event is
*named* (an ``event:`` line) and its JSON repeats the name in ``"type"``.  A
stream opens with ``message_start`` (the message envelope: id, role, model,
an empty ``content`` list, no stop reason yet, usage with the input tokens),
then one content block per part of the answer -- here always one text block,
index 0 -- as ``content_block_start``, any number of ``content_block_delta``
(``text_delta``), ``content_block_stop``; then ``message_delta`` with the
``stop_reason`` (``end_turn``, ``max_tokens`` or ``stop_sequence``, with the
matched ``stop_sequence``) and the cumulative usage, and ``message_stop``.
Nothing else ends it: there is no ``[DONE]``.

The error cases keep their ``patterns/`` homes; only their spelling differs:

* heartbeat (lesson 08): an ``event: ping`` with ``{"type": "ping"}`` -- a
  real event the SDKs know to skip -- instead of an SSE comment;
* a failure after the 200 (lesson 07): ``event: error`` with Anthropic's
  error object ``{"type": "error", "error": {"type", "message"}}``, then the
  body ends without ``message_stop``, so no client takes it for a finished
  answer (the SDK raises on the event);
* every error *before* the stream is Anthropic-shaped as well: ``app.py``'s
  handlers call :func:`error_response` for any path under ``/v1/messages``.

Error types by HTTP status follow Anthropic's errors page (400
``invalid_request_error``, 401 ``authentication_error``, 403
``permission_error``, 404 ``not_found_error``, 413 ``request_too_large``, 429
``rate_limit_error``, 500 ``api_error``, 529 ``overloaded_error``; other 4xx
are ``invalid_request_error``).  Our 503 (overloaded, shutting down) keeps its
status and, being the same condition, gets ``overloaded_error``; our 504
gets ``timeout_error``, the type the SDK names for a gateway timeout.  A
mid-stream failure's type comes from the status ``FAILURES`` gives its code.

The message id is the generation's id (``chatcmpl-…``), not ``msg_…``: it is
the key of the trace (``/v1/debug/generations/{id}``) and of ``X-Request-Id``
on every protocol; it is also sent as ``request-id``, which the SDK exposes.
"""

from __future__ import annotations

from json.encoder import encode_basestring as json_string
from typing import Any

from quart import Quart, Response

from ..backend import ModelError
from ..engine import Engine, Generation
from ..jsonwire import dumps
from ..patterns.errors import FAILURES, APIError
from ..sse import encode
from .anthropic_request import parse_messages_request
from .http_json import json_response, read_json_body
from .sse_chat import collect, stream_response

PATH = "/v1/messages"
_MARK = "\x00CONTENT\x00"  # placeholder that cannot occur in JSON output

# region: anthropic-errors
#: HTTP status -> Anthropic's error ``type`` (see the module docstring).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error object (before or during a stream)."""
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def speaks_anthropic(path: str) -> bool:
    """Whether an error on ``path`` must be in Anthropic's shape (``app.py``)."""
    return path == PATH or path.startswith(PATH + "/")


def error_response(err: APIError) -> Response:
    """An error before the stream, for ``app.py``'s handlers: same status and
    headers (``Retry-After``) as on the OpenAI routes, Anthropic's body."""
    headers = err.headers()
    body = error_body(err.status, err.message, headers.get("X-Request-Id"))
    return json_response(body, err.status, headers)


# endregion: anthropic-errors


def stop_reason(gen: Generation) -> str:
    """The engine's OpenAI-style ``finish_reason`` in Anthropic's words."""
    if gen.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if gen.stop_sequence is not None else "end_turn"


# region: event-framer
class EventFramer:
    """Builds the SSE bytes of one stream's events, pre-encoded per request
    (the same trick as ``sse_chat.ChunkFramer``: a token costs one string
    escape and two concatenations)."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _MARK}}
        template = encode(dumps(delta), event="content_block_delta").decode()
        self._prefix, self._suffix = template.split(json_string(_MARK))

    def start(self) -> bytes:
        """``message_start`` and the text block's ``content_block_start``."""
        gen = self.gen
        message = message_object(gen, content=[], stop_reason=None, output_tokens=0)
        start = event("message_start", message=message)
        return start + event("content_block_start", index=0, content_block={"type": "text", "text": ""})

    def content(self, tokens: list[str]) -> bytes:
        p, s = self._prefix, self._suffix
        return "".join([p + json_string(t) + s for t in tokens]).encode()

    def end(self) -> bytes:
        """The block's end, the stop reason with the usage, the message's end."""
        gen = self.gen
        delta = {"stop_reason": stop_reason(gen), "stop_sequence": gen.stop_sequence}
        usage = {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens}
        return (
            event("content_block_stop", index=0)
            + event("message_delta", delta=delta, usage=usage)
            + event("message_stop")
        )

    def heartbeat(self) -> bytes:
        """A silence (lesson 08): a real event, which every Anthropic client skips."""
        self.gen.heartbeat()
        return PING

    def error(self, err: ModelError) -> bytes:
        """A failure after the 200: one ``error`` event; the body then ends."""
        status, _ = FAILURES.get(err.code, (500, False))
        return encode(dumps(error_body(status, err.message, self.gen.id)), event="error")


def event(name: str, **fields: Any) -> bytes:
    """One named event whose JSON repeats its name as ``type``."""
    return encode(dumps({"type": name, **fields}), event=name)


#: The heartbeat, encoded once: a named event, not an SSE comment.
PING = event("ping")


# endregion: event-framer


def message_object(gen: Generation, content: list, stop_reason: str | None, output_tokens: int) -> dict:
    """The ``message`` envelope: streamed empty in ``message_start``, or whole."""
    return {
        "id": gen.id,
        "type": "message",
        "role": "assistant",
        "model": gen.request.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": gen.stop_sequence if stop_reason else None,
        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": output_tokens},
    }


# region: anthropic-stream
def register(app: Quart, engine: Engine) -> None:
    config = app.config["REFIMPL"]

    @app.post(PATH)
    async def messages() -> Response:
        params = parse_messages_request(
            await read_json_body(), served_model=config.model_name, defaults=config.simulate
        )
        gen = engine.start(params.model_request, "sse" if params.stream else "http")
        headers = {"X-Request-Id": gen.id, "request-id": gen.id}
        if params.stream:  # sse_chat's writer, this module's words
            return await stream_response(app, gen, EventFramer(gen), params.backpressure, headers)
        text = await collect(gen, headers, config)  # a failure is a status: app.py shapes it
        content = [{"type": "text", "text": text}]
        return json_response(
            message_object(gen, content, stop_reason(gen), gen.completion_tokens), 200, headers
        )


# endregion: anthropic-stream
