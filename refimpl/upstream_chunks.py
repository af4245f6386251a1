"""What we ask an OpenAI-compatible upstream, and what its stream says, without I/O (lesson 14).

Strategy
--------
``upstream_stream.py`` moves bytes: it sends the request, reads the socket,
and hands tokens to the engine through a channel.  This module only says
what the bytes are.  :func:`request_body` is what we ask: the client's
request, streamed, with usage.  And it *reads* the answer, the way
``refimpl/sse/`` reads an event stream: a
:class:`ChunkDecoder` is fed the body's bytes as they come and returns, in
order, exactly the items that channel carries -- each token's text, and last
(once) how the stream ended: :class:`Finished`, or a
:class:`~refimpl.backend.ModelError` with an ``upstream_*`` code.  It imports
no trio or httpx (``tests/test_sse_parser.py`` checks), so its case tables
(``tests/test_upstream_chunks.py``) need no server.

The format it reads is OpenAI's Chat Completions *streaming* answer
(``stream: true``), which vLLM, llama.cpp's server, Ollama and refimpl
itself also speak:

* the body is an event stream (``text/event-stream``, parsed by our
  :class:`~refimpl.sse.SSEParser`); each event's data is one JSON object,
  a ``chat.completion.chunk``;
* a chunk's ``choices[i].delta.content`` is the next piece of text (the
  first delta carries only the role; an empty content is not a token), and
  ``choices[i].finish_reason`` becomes non-null on the last one of a
  choice: ``stop``, ``length``, ``content_filter``...;
* asked for with ``stream_options.include_usage``, one more chunk with an
  empty ``choices`` list carries ``usage`` (``prompt_tokens``,
  ``completion_tokens``) for the whole request;
* the literal data ``[DONE]`` ends the stream;
* a failure after the stream started cannot change the status any more, so
  the server sends an event whose JSON holds an ``error`` object -- some
  name the event ``error`` (refimpl), others only put the ``error`` key in
  a plain data line; both are read as a failure here.

Rules of our own, where the format says nothing: a stream that ends
without ``[DONE]`` but after a ``finish_reason`` is accepted (lenient: the
answer was whole); one that ends with neither was cut short.  An upstream
that sends :data:`GARBAGE_BYTES` without completing a single event is not
speaking this format (the parser would otherwise keep growing one line).
Before any stream, :func:`refusal` says what a non-200 answer means to us.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .backend import ModelError, ModelRequest
from .sse import Event, SSEParser

#: Bytes the upstream may send without completing a single SSE event before
#: we call it garbage: the parser would otherwise keep an endless line.
GARBAGE_BYTES = 1 << 20


# region: upstream-request
def request_body(request: ModelRequest) -> dict[str, Any]:
    """What we ask the upstream: the client's request, streamed, with usage."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": role, "content": content} for role, content in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # max_tokens, not max_completion_tokens: every OpenAI-compatible server
    # we know reads it (OpenAI's own reasoning models want the other).
    for name, value in (("max_tokens", request.max_tokens), ("temperature", request.temperature)):
        if value is not None:
            body[name] = value
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.simulate_sent:  # only if the client sent one: a refimpl upstream obeys it
        body["simulate"] = request.simulate_sent
    return body


# endregion: upstream-request


@dataclass(frozen=True, slots=True)
class Finished:
    """The upstream finished: what it said about how, and its usage (None if
    it sent no usage chunk)."""

    finish_reason: str
    usage: dict[str, Any] | None


# region: chunk-decoder
class ChunkDecoder:
    """Bytes of one streamed Chat Completions answer in; tokens, then one
    ending (:class:`Finished` or :class:`ModelError`) out."""

    def __init__(self) -> None:
        self._parser = SSEParser()
        # Said by the chunks so far; kept until [DONE] (usage comes last).
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        # Bytes since the last complete event: the garbage guard.
        self._garbage = 0
        #: The upstream's own id for this generation (its first chunk's ``id``).
        self.upstream_id: str | None = None
        #: Set once the ending was returned: later bytes are ignored.
        self.ended = False

    def feed(self, data: bytes) -> list[str | Finished | ModelError]:
        """The items ``data`` completes: tokens, maybe an ending (last)."""
        if self.ended:
            return []
        events = self._parser.feed(data)
        self._garbage = 0 if events else self._garbage + len(data)
        if self._garbage > GARBAGE_BYTES:
            return self._end([], _error(f"The upstream sent {self._garbage} bytes without one event."))
        out: list[str | Finished | ModelError] = []
        for event in events:
            if event.data == "[DONE]":
                return self._end(out, Finished(self._finish or "stop", self._usage))
            chunk = _chunk(event)
            if isinstance(chunk, ModelError):
                return self._end(out, chunk)  # the tokens before it still go out
            self.upstream_id = self.upstream_id or chunk.get("id")
            if isinstance(chunk.get("usage"), dict):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str) and content:
                    out.append(content)
                self._finish = choice.get("finish_reason") or self._finish
        return out

    def end_of_body(self) -> Finished | ModelError:
        """The body ended (the connection closed cleanly) before ``[DONE]``."""
        self.ended = True
        if self._finish is not None:  # it had said how it finished: lenient
            return Finished(self._finish, self._usage)
        return _error("The upstream's stream ended before it finished.")

    def _end(
        self, out: list[str | Finished | ModelError], last: Finished | ModelError
    ) -> list[str | Finished | ModelError]:
        self.ended = True
        out.append(last)
        return out


# endregion: chunk-decoder


def _chunk(event: Event) -> dict[str, Any] | ModelError:
    """One event's JSON chunk, or the failure it reports or is."""
    try:
        value = json.loads(event.data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return _error(f"The upstream sent data that is not a JSON chunk: {event.data[:80]!r}.")
    if event.type == "error" or "error" in value:
        err = value.get("error")
        err = err if isinstance(err, dict) else {"message": str(err)}
        return _error(f"The upstream failed mid-stream ({err.get('code')}): {err.get('message')}")
    return value


def _error(message: str) -> ModelError:
    return ModelError("upstream_error", message)


# region: upstream-refusal
def not_a_stream(content_type: str) -> ModelError | None:
    """A 200 that is not an event stream (an HTML page, a JSON body...)."""
    if content_type.startswith("text/event-stream"):
        return None
    return _error(f"The upstream answered {content_type or 'no content type'}, not an event stream.")


def refusal(status: int, body: bytes, key_env: str | None) -> ModelError:
    """An answer other than 200, before any stream: what it means to us.

    ``body`` is the start of the upstream's error body (its OpenAI-shaped
    ``error.message`` is quoted if it has one); ``key_env`` names the
    variable our key came from, for the message a 401 or 403 gets.
    """
    try:
        said = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        said = body[:200].decode(errors="replace")
    if status in (401, 403):  # our key: the operator's to fix, not the client's
        where = f"${key_env}" if key_env else "no key (--upstream-key-env)"
        return _error(f"The upstream refused our key, {where} ({status}: {said}).")
    if status in (429, 503):  # busy: the client may try again later
        return ModelError("upstream_unavailable", f"The upstream is busy ({status}: {said}).")
    if 400 <= status < 500:  # the request itself: retrying it will not help
        return ModelError("upstream_rejected", f"The upstream rejected the request ({status}: {said}).")
    return _error(f"The upstream failed ({status}: {said}).")


# endregion: upstream-refusal
