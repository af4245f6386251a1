"""Validate an OpenAI Chat Completions request into a :class:`ModelRequest`.

Strategy
--------
A reference server must fail the way the real one does: a bad request gets
HTTP 400 and the OpenAI error shape naming the offending ``param``, never a
traceback, a 500 or a hang (STYLE §11).  This module is pure: it takes the
already-decoded JSON value and either returns the parsed request or raises
:class:`~refimpl.patterns.errors.APIError`.  It checks the parameters we act
on (``model``, ``messages``, ``stream``, ``stream_options``, ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``seed``, ``stop``, ``n``) and the
``simulate`` extension; like other OpenAI-compatible servers it accepts and
ignores the many parameters that only change sampling (``top_p``, ``user``…).
Shared by the SSE endpoint and the WebSocket protocol (lesson 02).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..backend import ModelRequest, Simulate, serves
from ..patterns.errors import FAILURES, APIError

#: The values of the top-level ``"backpressure"`` field (``patterns/backpressure.py``).
POLICIES = ("pause", "coalesce", "disconnect")
_ROLES = {"system", "developer", "user", "assistant", "tool"}
# What the simulated model can fail with: each error code of the failure
# table, or "crash" for a plain exception (a bug; lesson 07).
FAIL_WITH = frozenset(FAILURES) - {"server_shutdown", "slow_consumer"} | {"crash"}


@dataclass(frozen=True, slots=True)
class ChatParams:
    model_request: ModelRequest
    stream: bool
    include_usage: bool
    backpressure: str | None = None  # None: the server's --backpressure
    resumable: bool = False  # log the events for a resume (patterns/resume.py)


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def optional_int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"'{key}' must be an integer >= {minimum}.", key)
    return value


def _content(value: Any, param: str) -> str:
    """Message content: a string, a list of text parts, or null."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict)]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise bad_request("Message content must be a string or a list of text parts.", param)


def parse_messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty array.", "messages")
    out = []
    for i, msg in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg["role"] not in _ROLES:
            raise bad_request(f"{param} must be an object with a role in {sorted(_ROLES)}.", param)
        out.append((msg["role"], _content(msg.get("content"), param + ".content")))
    return tuple(out)


def parse_simulate(value: Any, defaults: Simulate) -> Simulate:
    """The ``simulate`` extension object: known keys, numbers >= 0."""
    if value is None:
        return defaults
    if not isinstance(value, dict):
        raise bad_request("'simulate' must be an object.", "simulate")
    known = {f.name for f in fields(Simulate)}
    for key, v in value.items():
        param = f"simulate.{key}"
        if key not in known:
            raise bad_request(f"Unknown simulate knob '{key}'.", param, "unknown_parameter")
        if key == "fail_with":
            if v not in FAIL_WITH:
                raise bad_request(f"'simulate.fail_with' must be one of {sorted(FAIL_WITH)}.", param)
        elif v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1e9):
            raise bad_request(f"'{param}' must be a number from 0 to 1e9.", param)
        elif key in ("tokens", "fail_after_tokens", "seed") and v is not None and v != int(v):
            raise bad_request(f"'{param}' must be an integer.", param)
    return replace(defaults, **value)


def parse_backpressure(value: Any) -> str | None:
    """The top-level ``"backpressure"`` field (lesson 10); None: the server's."""
    if value is None or value in POLICIES:
        return value
    raise bad_request(f"'backpressure' must be one of {list(POLICIES)}.", "backpressure")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise bad_request("'stop' must be a string or an array of up to 4 strings.", "stop")


def served(body: dict[str, Any], served_model: str) -> str:
    """The request's ``model``: present, and the one this server serves (404
    otherwise).  Shared with the Responses dialect (``responses_request.py``)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", "model", "missing_required_parameter")
    if not serves(served_model, model):  # an upstream's names too (backend.ModelNames)
        names = ", ".join(f"'{n}'" for n in [served_model, *sorted(getattr(served_model, "others", ()))])
        raise APIError(
            404,
            f"The model '{model}' does not exist. This server serves {names}.",
            param="model",
            code="model_not_found",
        )
    return model


def temperature(body: dict[str, Any]) -> float | None:
    """``temperature``: absent, or a number from 0 to 2 (both dialects)."""
    value = body.get("temperature")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2
    ):
        raise bad_request("'temperature' must be a number between 0 and 2.", "temperature")
    return value


# region: request-validation
def parse_chat_request(body: Any, *, served_model: str, defaults: Simulate) -> ChatParams:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    model = served(body, served_model)
    messages = parse_messages(body.get("messages"))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    if optional_int(body, "n", 1) not in (None, 1):
        raise bad_request("Only n=1 is supported.", "n")
    temperature(body)
    max_tokens = optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1)
    request = ModelRequest(
        messages=messages,
        model=model,
        max_tokens=max_tokens,
        seed=optional_int(body, "seed", -(2**63)),
        stop=_stop(body.get("stop")),
        simulate=parse_simulate(body.get("simulate"), defaults),
        temperature=temperature(body),
        simulate_sent=body.get("simulate") or None,
    )
    resumable = body.get("resumable", False)
    if not isinstance(resumable, bool):
        raise bad_request("'resumable' must be a boolean.", "resumable")
    if resumable and not stream:
        raise bad_request("'resumable' is only allowed when 'stream' is enabled.", "resumable")
    return ChatParams(request, stream, include_usage, parse_backpressure(body.get("backpressure")), resumable)


# endregion: request-validation
