"""Validate an Anthropic Messages request into a :class:`ModelRequest`.

Strategy
--------
The sibling of ``chat_request.py``, for the other dialect the server speaks
(``anthropic_messages.py``, lesson 14).  Pure like it: it takes the decoded
JSON value and returns the parsed request or raises
:class:`~refimpl.patterns.errors.APIError`, which ``app.py`` renders in
Anthropic's error shape because the path is ``/v1/messages``.

Where the two dialects differ in what they *ask*, the rules here follow
Anthropic's Messages API reference (the request body of ``POST /v1/messages``)
and the official Python SDK's ``MessageCreateParams``:

* ``max_tokens`` is required (OpenAI's is optional);
* the system prompt is a top-level ``system`` field, a string or a list of
  text blocks, not a message (the SDK's newer types also allow a ``system``
  message, so one is accepted);
* each message's ``content`` is a string or a list of content blocks; this
  server reads only ``text`` blocks and says so for any other kind;
* stop strings are ``stop_sequences``, and there is no ``seed`` (the
  simulated model's seed rides in our ``simulate`` extension);
* a field Anthropic does not know is an error ("extra inputs are not
  permitted"), not silently ignored as OpenAI-compatible servers do.  So
  every field the API defines is listed below: those that only steer
  sampling, tools or billing are accepted and ignored, as a server with no
  such features would; an unknown one, ``resumable`` included (resume is a
  Chat Completions feature here), gets a 400 naming it.

Messages read the way Anthropic's do, ``field.path: what is wrong``, since
its error object has no ``param`` to name the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import ModelRequest, Simulate, serves
from ..patterns.errors import APIError
from .chat_request import bad_request, parse_backpressure, parse_simulate

# Fields of Anthropic's request that change nothing a simulated model (or an
# OpenAI-compatible upstream) could do differently: accepted, ignored.
IGNORED = frozenset(
    {
        "metadata",
        "temperature",
        "top_k",
        "top_p",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "output_config",
        "speed",
    }
)
USED = frozenset({"model", "max_tokens", "messages", "system", "stop_sequences", "stream"})
EXTENSIONS = frozenset({"simulate", "backpressure"})  # ours, as on /v1/chat/completions
_ROLES = ("user", "assistant", "system")


@dataclass(frozen=True, slots=True)
class MessagesParams:
    model_request: ModelRequest
    stream: bool
    backpressure: str | None = None  # None: the server's --backpressure


def _text(value: Any, path: str) -> str:
    """A string, or a list of text blocks joined (``system`` and ``content``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text":
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise bad_request(f"{path}.{i}: this server reads only text blocks, not {kind!r}.", path)
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{path}.{i}.text: a string is required.", path)
            texts.append(block["text"])
        return "".join(texts)
    raise bad_request(f"{path}: a string or a list of text blocks is required.", path)


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages: a non-empty list of messages is required.", "messages")
    out = []
    for i, msg in enumerate(value):
        path = f"messages.{i}"
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise bad_request(f"{path}.role: one of {list(_ROLES)} is required.", path)
        out.append((msg["role"], _text(msg.get("content"), path + ".content")))
    return tuple(out)


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise bad_request("stop_sequences: a list of strings is required.", "stop_sequences")


# region: messages-validation
def parse_messages_request(body: Any, *, served_model: str, defaults: Simulate) -> MessagesParams:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    for key in body:
        if key not in USED | IGNORED | EXTENSIONS:
            raise bad_request(f"{key}: Extra inputs are not permitted.", key, "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: a model name is required.", "model", "missing_required_parameter")
    if not serves(served_model, model):  # an upstream's names too (backend.ModelNames)
        raise APIError(404, f"model: {model} (this server serves {served_model!r}).", param="model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("max_tokens: an integer >= 1 is required.", "max_tokens")
    messages = _messages(body.get("messages"))
    if (system := body.get("system")) is not None:
        messages = (("system", _text(system, "system")), *messages)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream: a boolean is required.", "stream")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 1
    ):
        raise bad_request("temperature: a number from 0 to 1 is required.", "temperature")
    if (metadata := body.get("metadata")) is not None and not isinstance(metadata, dict):
        raise bad_request("metadata: an object is required.", "metadata")
    request = ModelRequest(
        messages=messages,
        model=model,
        max_tokens=max_tokens,
        stop=_stop_sequences(body.get("stop_sequences")),
        simulate=parse_simulate(body.get("simulate"), defaults),
    )
    return MessagesParams(request, stream, parse_backpressure(body.get("backpressure")))


# endregion: messages-validation
