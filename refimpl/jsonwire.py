"""JSON on the wire: one compact encoder for each purpose, one strict decoder.

No I/O here (it is used by the sans-IO message modules).

Strategy
--------
Every protocol module writes and reads JSON; doing it in one place keeps the
bytes identical across them and the edge cases decided once:

* :func:`dumps` — compact, non-ASCII as raw UTF-8 — for text that is *ours*
  (stream chunks, the model's tokens): the smallest bytes, and the same ones
  the pre-encoded chunk templates produce (lesson 02).
* :func:`dumps_ascii` — compact, non-ASCII as ``\\uXXXX`` escapes — for any
  body that may echo the *client's* strings (an unknown model name in an
  error, a WebSocket message).  JSON can carry a lone surrogate such as
  ``"\\ud800"``, which is not valid Unicode and which UTF-8 cannot encode; an
  ASCII escape passes it back unharmed instead of crashing the response.
  Every plain JSON endpoint answers with it (``protocols/http_json.py``).
* :func:`loads_strict` — RFC 8259 JSON and nothing more: Python's decoder
  also accepts ``NaN`` and ``Infinity``, turns ``1e400`` into ``inf``, and
  recurses out on ``[[[[…``; each of those is the caller's mistake, so each
  is a 400 ``invalid_json`` in the OpenAI error shape, never a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any

_COMPACT = (",", ":")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=_COMPACT, ensure_ascii=False)


def dumps_ascii(value: Any) -> str:
    return json.dumps(value, separators=_COMPACT)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"number out of range: {text}")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def loads_strict(raw: str | bytes, what: str = "the JSON body of your request") -> Any:
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        # Imported here, not at the top: patterns/errors.py encodes its error
        # events with this module, so a top-level import would be a cycle.
        from .patterns.errors import APIError

        reason = "it is nested too deeply" if isinstance(err, RecursionError) else err
        raise APIError(400, f"We could not parse {what}: {reason}.", code="invalid_json") from None
