"""Exercise 01, a solution: an SSE reader that survives the network.

The task is in ``../exercise.py``.  Lines are cut from *bytes* and decoded
whole, so a UTF-8 character cut across reads is never decoded in halves; a
CR that ends a chunk ends its line at once, and an LF that starts the next
chunk is the rest of that CRLF, not an empty line (``refimpl/sse/parser.py``
does the same on text, with an incremental decoder).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LINE_END = re.compile(rb"\r\n|\r|\n")  # §9.2.5: CRLF, or a lone CR, or a lone LF


def read_events(chunks: Iterable[bytes]) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    data: list[str] = []
    kind = ""
    pending, after_cr = b"", False
    for chunk in chunks:
        if after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF that the last read cut in two
        if not chunk:
            continue
        after_cr = chunk.endswith(b"\r")
        *lines, pending = LINE_END.split(pending + chunk)
        for line in (raw.decode("utf-8", "replace") for raw in lines):
            if not line:  # an empty line dispatches
                if data:
                    events.append((kind or "message", "\n".join(data)))
                data, kind = [], ""
            elif not line.startswith(":"):  # a comment is skipped
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")  # ONE space
                if name == "data":
                    data.append(value)
                elif name == "event":
                    kind = value
    return events  # an event without its empty line is discarded
