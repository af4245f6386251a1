"""Validate an OpenAI Responses request into a :class:`ModelRequest`.

Strategy
--------
The Responses API (``POST /v1/responses``) asks for the same thing as Chat
Completions in other words: ``input`` instead of ``messages``,
``instructions`` instead of a leading system message, ``max_output_tokens``
instead of ``max_tokens``.  This module translates a request into the one
:class:`~refimpl.backend.ModelRequest` every protocol hands the engine, so
the same prompt and seed give the same text and the same usage on both
endpoints (``tests/test_responses.py`` checks it).  Like
``chat_request.py`` it is pure (no I/O): it takes the decoded JSON and
returns the parsed request or raises
:class:`~refimpl.patterns.errors.APIError`, which leaves as HTTP 400 (404
for an unknown model) in the OpenAI error shape, naming the ``param``.

What the API reference allows, and what we do with it:

* ``input``: a string (one user message), or a list of input items.  We
  take message items -- ``role`` one of user / assistant / system /
  developer, ``type`` ``"message"`` or left out, ``content`` a string or a
  list of ``input_text`` parts (``output_text`` too: an earlier assistant
  turn sent back as history).  Images, files, tool calls and tool outputs
  name things the simulated model cannot read: 400, naming the item.
* ``instructions`` comes first, as a system message: exactly what a Chat
  Completions client sends for the same conversation.
* ``max_output_tokens``: at least 16, as OpenAI insists.  The model stops
  there and the response ends ``incomplete`` (``openai_responses.py``).
* ``previous_response_id``, ``conversation`` and ``background: true`` ask
  the server to keep responses; this one keeps none, so they are refused
  rather than silently ignored (the answer would lack its context).
* Everything else that only steers sampling or storage (``top_p``,
  ``store``, ``metadata``, ``tools``, ``text``, ``reasoning``, ``user``...)
  is accepted and ignored, as Chat Completions' ``top_p`` is; the ones a
  response object repeats back are in :attr:`ResponsesParams.echo`.
* Our extensions ride along as in Chat Completions: ``simulate`` (its
  ``seed`` picks the text: the Responses API has no ``seed``) and
  ``backpressure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import ModelRequest, Simulate
from .chat_request import bad_request, optional_int, parse_backpressure, parse_simulate, served, temperature

#: OpenAI's smallest ``max_output_tokens``.
MIN_OUTPUT_TOKENS = 16
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")
# Each asks for state kept between requests (earlier responses, a
# conversation, a response that runs on after its request): none is kept here.
_STATEFUL = {
    "previous_response_id": "Earlier responses are not stored here; send the whole conversation as 'input'.",
    "conversation": "Conversations are not stored here; send the whole conversation as 'input'.",
    "background": "Background responses are not supported; stream it instead ('stream': true).",
}


@dataclass(frozen=True, slots=True)
class ResponsesParams:
    model_request: ModelRequest
    stream: bool
    backpressure: str | None  # None: the server's --backpressure
    #: The request's settings that the response object repeats back.
    echo: dict[str, Any]


def _text(value: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"'{param}' must be a string or an array of input_text parts.", param)
    texts = []
    for j, part in enumerate(value):
        if (
            not isinstance(part, dict)
            or part.get("type") not in _TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            why = (
                f"parts of type '{kind}' cannot be read by this model"
                if kind
                else "expected an input_text part"
            )
            raise bad_request(f"Invalid '{param}[{j}]': {why}.", f"{param}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def parse_input(value: Any) -> tuple[tuple[str, str], ...]:
    """``input`` as (role, text) pairs, in order."""
    if isinstance(value, str):
        return (("user", value),)
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of input items.", "input")
    out = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{param}' must be an object.", param)
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(
                f"Input items of type '{kind}' are not supported; send messages.", f"{param}.type"
            )
        if item.get("role") not in _ROLES:
            raise bad_request(f"'{param}.role' must be one of {list(_ROLES)}.", f"{param}.role")
        out.append((item["role"], _text(item.get("content"), f"{param}.content")))
    return tuple(out)


# region: responses-validation
def parse_responses_request(body: Any, *, served_model: str, defaults: Simulate) -> ResponsesParams:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model = served(body, served_model)
    for key, message in _STATEFUL.items():
        if body.get(key) not in (None, False):
            raise bad_request(message, key, "unsupported_parameter")
    if "input" not in body:
        raise bad_request("You must provide an 'input' parameter.", "input", "missing_required_parameter")
    messages = parse_input(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string.", "instructions")
    if instructions:
        messages = (("system", instructions), *messages)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    max_output_tokens = optional_int(body, "max_output_tokens", -(2**63))
    if max_output_tokens is not None and max_output_tokens < MIN_OUTPUT_TOKENS:
        raise bad_request(
            f"Invalid 'max_output_tokens': integer below minimum value."
            f" Expected a value >= {MIN_OUTPUT_TOKENS}, but got {max_output_tokens} instead.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    request = ModelRequest(
        messages=messages,
        model=model,
        max_tokens=max_output_tokens,
        simulate=parse_simulate(body.get("simulate"), defaults),
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "temperature": 1.0 if (t := temperature(body)) is None else t,
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "metadata": body.get("metadata") or {},
        "user": body.get("user"),
    }
    return ResponsesParams(request, stream, parse_backpressure(body.get("backpressure")), echo)


# endregion: responses-validation
