"""Two SSE readers people write before they read the spec.  Both are wrong.

Lesson 01 uses them as the broken half of a broken/fixed pair; the fixed half
is :class:`refimpl.sse.SSEParser`.  Each function takes the body of an event
stream as the network delivered it (a list of byte chunks, cut wherever TCP
and the server's writes happened to cut it) and returns the ``data`` of each
event it thinks it saw.

``naive_data``
    decodes every chunk on its own, splits it at ``"\\n"`` and keeps the
    lines that start with ``"data: "``.  It works on a laptop against a
    server that writes one event per write, which is why it gets written.
``line_buffered_data``
    the usual first repair: keep the unfinished last line until the next
    chunk arrives.  That fixes events cut across reads, and nothing else.

What they get wrong, all tested in ``tests/test_lesson_examples.py``:

1. CRLF line endings (WHATWG §9.2.5 allows CR, LF and CRLF): the CR stays
   glued to the value, so ``[DONE]`` arrives as ``"[DONE]\\r"`` and the
   end-of-stream check never matches.
2. An event cut across two reads (``naive_data`` only): the first half is a
   ``data:`` line with broken JSON, the second half does not start with
   ``"data: "`` and is silently dropped.
3. A multi-byte UTF-8 character cut across two reads (``naive_data`` only):
   ``bytes.decode`` raises ``UnicodeDecodeError``.
4. Multi-line data (``data: a`` / ``data: b`` is ONE event ``"a\\nb"``,
   §9.2.6): both return two events.
5. ``data:x`` without the space is valid (the space is optional, §9.2.6):
   both ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable


# region: naive-reader
def naive_data(chunks: Iterable[bytes]) -> list[str]:
    """BROKEN: one chunk at a time, split at LF, keep 'data: ' lines."""
    found = []
    for chunk in chunks:
        for line in chunk.decode("utf-8").split("\n"):
            if line.startswith("data: "):
                found.append(line[len("data: ") :])
    return found


# endregion: naive-reader


# region: line-buffered-reader
def line_buffered_data(chunks: Iterable[bytes]) -> list[str]:
    """STILL BROKEN: keeps the unfinished line, but still splits at LF only."""
    found = []
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode("utf-8")
            if text.startswith("data: "):
                found.append(text[len("data: ") :])
    return found


# endregion: line-buffered-reader
