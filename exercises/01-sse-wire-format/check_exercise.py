"""The check of exercise 01: your reader against refimpl's SSEParser.

Every body below is fed to both readers whole, one byte at a time, and cut
in two at every position, and the events must be the same each time: the
network may cut a body anywhere (lesson 01, "The broken version").  The
bodies are lesson 01's tour table (``refimpl/examples/sse_tour.py``) minus
the rows about the BOM, ``id`` and ``retry``, and a few more traps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from refimpl.examples.sse_tour import TOUR
from refimpl.sse import SSEParser

BODIES = [body for body, _ in TOUR if not body.startswith((b"\xef\xbb\xbf", b"id:", b"retry:"))] + [
    b"data: a\r\ndata: b\r\n\r\n",  # CRLF everywhere (sse-starlette writes this)
    b'data: {"x": 1}\r\n\r\ndata: [DONE]\r\n\r\n',  # [DONE], not "[DONE]\r"
    b"data: \xe2\x82\xac and \xf0\x9f\x99\x82\n\n",  # multi-byte UTF-8: cut inside a character
    b"event: error\ndata: {}\n\ndata: next\n\n",  # the type is reset after each event
    b"event: lonely\n\ndata: y\n\n",  # no data: no event, and the type is reset
    b": ping\n\ndata: a\rdata: b\r\r",  # lone CRs, after a comment
]


def want(body: bytes) -> list[tuple[str, str]]:
    parser = SSEParser()
    return [(e.type, e.data) for e in parser.feed(body) + parser.close()]


def check(read_events: Callable, cut: Callable[[bytes], list[list[bytes]]]) -> None:
    """Fail with the first few chunkings your reader gets wrong."""
    found = []
    for body in BODIES:
        for chunks in cut(body):
            got = read_events(chunks)
            if got != want(body):
                found.append(f"read_events({chunks!r})\n    got  {got!r}\n    want {want(body)!r}")
                break  # one chunking per body is enough to show it
    if found:
        more = f"\n(and {len(found) - 3} more bodies)" if len(found) > 3 else ""
        pytest.fail("\n".join(found[:3]) + more, pytrace=False)


def test_whole_bodies(exercise):
    check(exercise.read_events, lambda body: [[body]])


def test_one_byte_at_a_time(exercise):
    def bytewise(body: bytes) -> list[list[bytes]]:
        return [[body[i : i + 1] for i in range(len(body))]]

    check(exercise.read_events, bytewise)


def test_cut_in_two_anywhere(exercise):
    def halves(body: bytes) -> list[list[bytes]]:
        return [[body[:i], body[i:]] for i in range(1, len(body))]

    check(exercise.read_events, halves)


def test_a_crlf_cut_between_cr_and_lf(exercise, observe):
    """Push on it 1: one line ending, not two: the LF completes the CRLF."""
    got = exercise.read_events([b"data: a\r", b"\ndata: b\r\n\r\n"])
    observe("[b'data: a\\r', b'\\ndata: b\\r\\n\\r\\n'] gives", got)
    assert got == [("message", "a\nb")]
