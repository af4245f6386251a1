"""Tests for refimpl.sse.parser, three ways (STYLE.md §7).

1. A case table.  Every case is run whole, byte by byte, and cut in two at
   every possible point: a parser that only works when the network is kind
   fails here.
2. Hypothesis properties: any chunking gives the events of the whole body;
   no input bytes make the parser raise; and the parser agrees with
   ``reference_parse``, a deliberately naive transcription of WHATWG HTML
   §9.2.5-§9.2.6 that reads the whole body at once.
3. ``@example`` pins on the properties, one per trap found while writing the
   parser, so they are replayed on every run, not just when Hypothesis
   happens to find them again.
"""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
from itertools import pairwise
from typing import NamedTuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import refimpl.sse
from refimpl.sse import Event, SSEParser

BOM = b"\xef\xbb\xbf"


def parse(chunks: list[bytes]) -> tuple[list[Event], str, int | None]:
    """Feed ``chunks`` to a fresh parser, then close it; return everything seen."""
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    events += parser.close()
    return events, parser.last_event_id, parser.retry


# ---------------------------------------------------------------------------
# 1. The case table
# ---------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    body: bytes
    events: list[Event]
    last_event_id: str = ""
    retry: int | None = None


def msg(data: str, type: str = "message", id: str = "") -> Event:
    return Event(type=type, data=data, last_event_id=id)


CASES = [
    Case("simple", b"data: hello\n\n", [msg("hello")]),
    Case("empty stream", b"", []),
    Case("blank lines only", b"\n\r\n\r", []),
    Case("two events in one chunk", b"data: a\n\ndata: b\n\n", [msg("a"), msg("b")]),
    # -- byte order mark (§9.2.5: the UTF-8 decode drops one, at the start)
    Case("BOM stripped", BOM + b"data: a\n\n", [msg("a")]),
    # The second BOM is the first character of the field name "\ufeffdata",
    # an unknown field, so nothing is dispatched.
    Case("BOM only once", BOM + BOM + b"data: a\n\n", []),
    Case("BOM after first line kept", b"\n" + BOM + b"data: a\n\n", []),
    Case("BOM inside data kept", BOM + b"data: " + BOM + b"a\n\n", [msg("\ufeffa")]),
    # -- line endings: CRLF, lone LF, lone CR, and mixtures
    Case("CRLF", b"data: a\r\ndata: b\r\n\r\n", [msg("a\nb")]),
    Case("lone CR", b"data: a\rdata: b\r\r", [msg("a\nb")]),
    Case("mixed endings", b"data: a\r\ndata: b\rdata: c\n\n", [msg("a\nb\nc")]),
    Case(
        "LF then CRLF is a blank line",
        b"data: a\n\r\ndata: b\n\n",
        [msg("a"), msg("b")],
    ),
    Case("CR then CRLF is a blank line", b"data: a\r\r\n", [msg("a")]),
    Case("LF CR is two line endings", b"data: a\n\rdata: b\n\n", [msg("a"), msg("b")]),
    # A final lone CR is a complete line ending: the event is dispatched.
    Case("final CR dispatches", b"data: a\n\r", [msg("a")]),
    # U+2028, U+0085, VT and FF end lines for str.splitlines(), not for SSE.
    Case(
        "unicode line breaks are data",
        "data: a\u2028b\x85c\x0bd\x0ce\x1cf\n\n".encode(),
        [msg("a\u2028b\x85c\x0bd\x0ce\x1cf")],
    ),
    # -- comments and unknown fields
    Case("comments ignored", b": hi\ndata: a\n:\n:data: b\n\n", [msg("a")]),
    Case("comment alone dispatches nothing", b": ping\n\n", []),
    Case("unknown field ignored", b"foo: bar\ndata: a\n\n", [msg("a")]),
    Case("field names are case sensitive", b"Data: a\nDATA: b\n\n", []),
    # -- name/value split
    Case("no colon: empty data line", b"data\n\n", [msg("")]),
    Case("two bare data lines", b"data\ndata\n\n", [msg("\n")]),
    Case("no space after colon", b"data:x\n\n", [msg("x")]),
    Case("one space removed", b"data: x\n\n", [msg("x")]),
    Case("only one space removed", b"data:  x\n\n", [msg(" x")]),
    Case("trailing space kept", b"data: x \n\n", [msg("x ")]),
    Case("tab is not a space", b"data:\tx\n\n", [msg("\tx")]),
    Case("space before colon", b"data : x\n\n", []),
    Case("split at first colon", b"data: a:b\ndata::c\n\n", [msg("a:b\n:c")]),
    Case("data joined with LF", b"data: a\ndata: b\ndata: c\n\n", [msg("a\nb\nc")]),
    Case("empty last data line", b"data: a\ndata:\n\n", [msg("a\n")]),
    # -- event type
    Case("event type", b"event: delta\ndata: a\n\n", [msg("a", "delta")]),
    Case(
        "event reset after dispatch",
        b"event: x\ndata: a\n\ndata: b\n\n",
        [msg("a", "x"), msg("b")],
    ),
    Case("empty event is message", b"event: x\nevent:\ndata: a\n\n", [msg("a")]),
    Case("event reset even if nothing dispatched", b"event: x\n\ndata: a\n\n", [msg("a")]),
    # -- id and the last event ID
    Case("id", b"id: 1\ndata: a\n\n", [msg("a", id="1")], "1"),
    Case(
        "id persists",
        b"id: 1\ndata: a\n\ndata: b\n\n",
        [msg("a", id="1"), msg("b", id="1")],
        "1",
    ),
    Case("id after data applies", b"data: a\nid: 2\n\n", [msg("a", id="2")], "2"),
    Case(
        "empty id resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\nid: 3\n\nid:\n\n",
        [msg("a", id="1"), msg("b")],
        "",
    ),
    Case(
        "id with NUL ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [msg("a", id="1"), msg("b", id="1")],
        "1",
    ),
    # Dispatch sets the last event ID before it looks at the data buffer.
    Case("id without data still sets last_event_id", b"id: 5\n\n", [], "5"),
    Case(
        "id survives an empty dispatch",
        b"id: 5\n\ndata: a\n\n",
        [msg("a", id="5")],
        "5",
    ),
    # -- retry
    Case("retry", b"retry: 1000\n\n", [], retry=1000),
    Case("retry leading zeros", b"retry: 007\n", [], retry=7),
    Case("retry huge", b"retry: 99999999999999999999\n", [], retry=99999999999999999999),
    Case("retry of 640 digits", b"retry: " + b"9" * 640 + b"\n", [], retry=10**640 - 1),
    Case(
        "retry too long ignored",
        b"retry: 1\nretry: " + b"9" * 5000 + b"\n",
        [],
        retry=1,
    ),
    Case(
        "retry leading zeros do not count",
        b"retry: " + b"0" * 5000 + b"5\n",
        [],
        retry=5,
    ),
    Case("retry non-digit ignored", b"retry: 10a\n", []),
    Case("retry empty ignored", b"retry: \nretry\n", []),
    Case("retry sign ignored", b"retry: -1\nretry: +1\n", []),
    Case("retry two spaces ignored", b"retry:  1\n", []),
    Case("retry non-ASCII digits ignored", "retry: ²\nretry: ٣\n".encode(), []),
    Case("invalid retry keeps the old one", b"retry: 5\nretry: x\n", [], retry=5),
    Case("retry applies without blank line", b"retry: 9\n", [], retry=9),
    # -- end of stream (§9.2.5: pending data is discarded)
    Case("unfinished event discarded", b"data: a\n\ndata: b\n", [msg("a")]),
    Case("incomplete last line discarded", b"data: a\n\ndata: b", [msg("a")]),
    Case(
        "unfinished id is not last_event_id",
        b"data: a\n\nid: 9\ndata: b\n",
        [msg("a")],
        "",
    ),
    Case("incomplete retry line discarded", b"retry: 9", []),
    # -- UTF-8 decoding
    Case("multibyte", "data: € 😀 é\n\n".encode(), [msg("€ 😀 é")]),
    Case("invalid bytes replaced", b"data: \xff\xfe\n\n", [msg("\ufffd\ufffd")]),
    Case("truncated sequence is one U+FFFD", b"data: \xe2\x82\n\n", [msg("\ufffd")]),
    Case(
        "encoded surrogate is three U+FFFD",
        b"data: \xed\xa0\x80\n\n",
        [msg("\ufffd" * 3)],
    ),
    Case("truncated sequence before newline", b"data: \xf0\x9f\n\n", [msg("\ufffd")]),
    Case("truncated sequence at end of stream", b"data: a\n\ndata: \xe2", [msg("a")]),
    Case(
        "NUL passes through data",
        b"data: a\x00b\nevent: c\x00d\n\n",
        [msg("a\x00b", "c\x00d")],
    ),
    # -- size
    Case("very long line", b"data: " + b"x" * 5000 + b"\n\n", [msg("x" * 5000)]),
    Case("many data lines", b"data: y\n" * 500 + b"\n", [msg("\n".join(["y"] * 500))]),
]


def check(case: Case, chunks: list[bytes]) -> None:
    assert b"".join(chunks) == case.body
    assert parse(chunks) == (case.events, case.last_event_id, case.retry)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_whole(case: Case) -> None:
    check(case, [case.body])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_byte_by_byte(case: Case) -> None:
    check(case, [case.body[i : i + 1] for i in range(len(case.body))])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_every_split_point(case: Case) -> None:
    for i in range(len(case.body) + 1):
        check(case, [case.body[:i], case.body[i:]])


# ---------------------------------------------------------------------------
# Behaviour outside the table
# ---------------------------------------------------------------------------


def test_events_are_returned_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [msg("a")]
    # A CR is a line ending the moment it arrives; no waiting for a
    # possible LF (which would stall a live stream until the next chunk).
    assert parser.feed(b"data: b\r\r") == [msg("b")]
    assert parser.feed(b"\n") == []  # ...and the LF that follows is absorbed


def test_last_event_id_changes_only_at_blank_lines() -> None:
    parser = SSEParser()
    parser.feed(b"id: 1\n")
    assert parser.last_event_id == ""
    parser.feed(b"\n")
    assert parser.last_event_id == "1"


def test_close_discards_and_is_idempotent() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 1\ndata: a\n") == []
    assert parser.close() == []
    assert parser.close() == []
    assert parser.last_event_id == ""
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


def test_event_is_frozen() -> None:
    event = Event()
    assert event == Event(type="message", data="", last_event_id="")
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]


def test_long_line_in_small_chunks_is_linear() -> None:
    # The line being read is kept as a list of pieces and joined once.  Were
    # it one string grown chunk by chunk, the cost would grow with the square
    # of the line length (measured: ~40x slower for this 4 MiB line).
    line = b"data: " + b"z" * (4 << 20) + b"\n\n"
    chunks = [line[i : i + 256] for i in range(0, len(line), 256)]
    assert parse(chunks)[0] == [msg("z" * (4 << 20))]


def test_package_docstring_runs() -> None:
    assert doctest.testmod(refimpl.sse).failed == 0


#: The sans-IO modules (STYLE §1): protocol rules and pure types that a test,
#: a notebook or another event loop can use without a server.
SANS_IO_MODULES = [
    "refimpl.sse",
    "refimpl.protocols.ws_messages",
    "refimpl.protocols.chat_request",
    "refimpl.backend",
    "refimpl.jsonwire",
    "refimpl.patterns.errors",
    "refimpl.upstream_chunks",
]
IO_LIBRARIES = {"trio", "quart", "httpx", "anyio", "selectors", "hypercorn", "asyncio", "socket", "ssl"}


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_imports_no_io_library(module: str) -> None:
    # A fresh interpreter, so nothing imported by pytest or other tests hides
    # an import the module makes (a type hint too: those belong under
    # TYPE_CHECKING).  Anything already loaded at startup is excluded from
    # "new" but still listed in "before" for the check below.
    script = (
        f"import sys, json; before = set(sys.modules); import {module}; "
        "print(json.dumps([sorted(before), sorted(set(sys.modules) - before)]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, new = map(set, json.loads(result.stdout))
    assert module in new  # it really was imported here, not before
    loaded = {name.partition(".")[0] for name in new}
    assert loaded & IO_LIBRARIES == set(), f"{module} imports I/O"
    # The always-banned ones must not even be around at startup.
    at_startup = {name.partition(".")[0] for name in before}
    assert at_startup.isdisjoint({"trio", "quart", "httpx", "anyio"})


# ---------------------------------------------------------------------------
# 2. Properties, and 3. their pinned examples
# ---------------------------------------------------------------------------


def reference_parse(body: bytes) -> tuple[list[Event], str, int | None]:
    """The spec read literally, on the whole body at once.  Slow and obvious."""
    text = body.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    lines.pop()  # no line ending after it: discarded at end of file
    events, data, event_type, id_buffer, last_id, retry = [], "", "", "", "", None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data != "":
                data = data.removesuffix("\n")
                events.append(Event(event_type or "message", data, last_id))
            data = event_type = ""
            continue
        if line.startswith(":"):
            continue
        name, value = line.split(":", 1) if ":" in line else (line, "")
        value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            digits = value.lstrip("0") or "0"
            retry = int(digits) if len(digits) <= 640 else retry  # see the parser
    return events, last_id, retry


def cut(body: bytes, points: list[int]) -> list[bytes]:
    """Cut ``body`` at ``points`` (clamped, sorted; repeats give empty chunks)."""
    bounds = [0, *sorted(min(p, len(body)) for p in points), len(body)]
    return [body[a:b] for a, b in pairwise(bounds)]


# Pieces that SSE-like bodies are built from: the words the parser looks
# for, every line ending, the BOM, and broken or split UTF-8.
piece = st.sampled_from(
    [
        b"data",
        b"event",
        b"id",
        b"retry",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        BOM,
        b"\x00",
        b"7",
        b"x",
        "é😀".encode(),
        b"\xff",
        b"\xe2\x82",
        b"\xed\xa0\x80",
        "\u2028".encode(),
    ]
)
line_end = st.sampled_from([b"\n", b"\r", b"\r\n"])
field = st.builds(
    lambda name, sep, value, end: name + sep + value + end,
    st.sampled_from([b"data", b"data", b"event", b"id", b"id", b"retry", b"dat", b""]),
    st.sampled_from([b":", b": ", b":  ", b""]),
    st.one_of(
        st.sampled_from([b"", b"x", b" x", b"12", b"0", b"a\x00b", b"\x00", b"1 ", b"\xff"]),
        st.text(max_size=6).map(str.encode),
        st.binary(max_size=4),
    ),
    line_end,
)
# An event block: some field lines, then the blank line that dispatches.
block = st.builds(lambda fields, end: b"".join(fields) + end, st.lists(field, max_size=4), line_end)
# Mostly blocks, so that fields and dispatches really interact (an event
# line in one block, a data line in the next), with raw pieces and random
# bytes mixed in to break the structure up.
sse_like = st.lists(st.one_of(block, block, block, piece, st.binary(max_size=3)), max_size=12).map(b"".join)
cut_points = st.lists(st.integers(min_value=0, max_value=160), max_size=12)

TRAPS = [
    (b"data: a\r\ndata: b\r\n\r\n", [8]),  # CR | LF: one line ending, not two
    (b"data: a\r\n\r\n", [8, 8]),  # CR | empty chunk | LF
    (BOM + b"data: a\n\n", [1, 2]),  # BOM arriving one byte at a time
    (BOM + BOM + b"data: a\n\n", [3]),  # a BOM at the start of chunk 2 is data
    (BOM + b"data: a\n\n", [0, 3, 3]),  # chunk holding only the BOM
    ("data: €\n\n".encode(), [7, 8]),  # multibyte character in three pieces
    (b"data: \xe2\n\n", [7]),  # truncated character, then a line ending
    (b"data: a\r\r\n", [8, 9]),  # CR | CR | LF
    (b"\r\n", [1]),  # split CRLF at the very start
    (b"data: a\n\r", [8]),  # final CR after a chunk boundary
]


def with_traps(test):
    for body, points in TRAPS:
        test = example(body=body, points=points)(test)
    return test


@settings(max_examples=400, deadline=None)
@with_traps
@given(body=sse_like, points=cut_points)
def test_any_chunking_gives_the_same_events(body: bytes, points: list[int]) -> None:
    assert parse(cut(body, points)) == parse([body])


@settings(max_examples=800, deadline=None)
@with_traps
@given(body=sse_like, points=cut_points)
def test_agrees_with_reference_model(body: bytes, points: list[int]) -> None:
    assert parse(cut(body, points)) == reference_parse(body)


@settings(max_examples=300, deadline=None)
@example(body="retry: ²\n\n".encode(), points=[])  # str.isdigit() accepts "²"; int() does not
@example(body=b"\xef\xbb", points=[1])  # half a BOM, then end of stream
@example(body=b"retry: " + b"9" * 5000 + b"\n", points=[])  # int() refuses > 4300 digits
@given(body=st.binary(max_size=200), points=cut_points)
def test_never_raises_on_any_bytes(body: bytes, points: list[int]) -> None:
    events, last_event_id, retry = parse(cut(body, points))
    assert all(isinstance(event, Event) for event in events)
    assert isinstance(last_event_id, str)
    assert retry is None or retry >= 0
