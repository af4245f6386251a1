"""Tests for refimpl.sse.encoder.

The encoder's one promise is that the parser reads back what it wrote, so
most of this file is that round trip: exact bytes for a few readable cases,
the values the format cannot carry (refused with ValueError, or normalised
in the one documented way), and Hypothesis properties over arbitrary text.
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refimpl.sse import Event, SSEParser, comment, encode


def read_back(body: bytes) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    return parser.feed(body) + parser.close(), parser


def as_read(data: str) -> str:
    """What a reader returns for ``data``: every CRLF or lone CR becomes LF."""
    return re.sub(r"\r\n?", "\n", data)


# -- exact output -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": "hello"}, b"data: hello\n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\n"}, b"data: a\ndata: \n\n"),
        ({"data": "a\r\nb\rc"}, b"data: a\ndata: b\ndata: c\n\n"),
        ({"data": " x"}, b"data:  x\n\n"),
        ({"data": "€"}, "data: €\n\n".encode()),
        ({"data": "a\u2028b"}, "data: a\u2028b\n\n".encode()),
        (
            {"data": "{}", "event": "delta", "id": "7", "retry": 3000},
            b"id: 7\nevent: delta\nretry: 3000\ndata: {}\n\n",
        ),
        ({"data": "x", "id": ""}, b"id: \ndata: x\n\n"),
    ],
)
def test_encode_bytes(kwargs: dict, expected: bytes) -> None:
    assert encode(**kwargs) == expected


def test_comment_bytes() -> None:
    assert comment("ping") == b": ping\n"
    assert comment("a\r\nb") == b": a\n: b\n"


# -- what the reader gets back --------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "event"),
    [
        ({"data": "hello"}, Event("message", "hello", "")),
        ({"data": ""}, Event("message", "", "")),
        # CR and CRLF inside data come back as LF: a limit of the format.
        ({"data": "a\r\nb\rc\n"}, Event("message", "a\nb\nc\n", "")),
        ({"data": "  two spaces "}, Event("message", "  two spaces ", "")),
        ({"data": "x", "event": " spaced"}, Event(" spaced", "x", "")),
        ({"data": "x", "event": ""}, Event("message", "x", "")),
        ({"data": "x", "event": "a\x00b"}, Event("a\x00b", "x", "")),
        ({"data": "x", "id": " 1"}, Event("message", "x", " 1")),
    ],
)
def test_round_trip_cases(kwargs: dict, event: Event) -> None:
    assert read_back(encode(**kwargs))[0] == [event]


@pytest.mark.parametrize("retry", [0, 3000, 10**640 - 1])
def test_retry_is_read_back(retry: int) -> None:
    _, parser = read_back(encode("x", retry=retry))
    assert parser.retry == retry


def test_comment_is_invisible_to_the_reader() -> None:
    # A heartbeat in the middle of an event changes nothing.
    body = b"data: a\n" + comment("ping\nmore") + b"data: b\n\n"
    events, parser = read_back(body)
    assert events == [Event("message", "a\nb", "")]
    # Text that looks like fields stays a comment, line by line.
    events, parser = read_back(comment("id: 1\nretry: 5\ndata: x\n") + b"\n")
    assert (events, parser.last_event_id, parser.retry) == ([], "", None)


# -- values the format cannot carry --------------------------------------------


@pytest.mark.parametrize("field", ["event", "id"])
@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\r\nb", "\n", "x\ndata: injected"])
def test_line_break_in_single_line_field_is_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        encode("x", **{field: value})


def test_nul_in_id_is_refused() -> None:
    # A reader would silently ignore the whole id field.
    with pytest.raises(ValueError, match="NUL"):
        encode("x", id="1\x002")


@pytest.mark.parametrize(
    ("retry", "error"),
    [
        (-1, ValueError),
        (10**640, ValueError),
        (True, TypeError),
        (1.5, TypeError),
        ("5", TypeError),
    ],
)
def test_bad_retry_is_refused(retry: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode("x", retry=retry)  # type: ignore[arg-type]


# -- properties ---------------------------------------------------------------

single_line = st.text().filter(lambda s: "\r" not in s and "\n" not in s)
ids = single_line.filter(lambda s: "\0" not in s)


@settings(max_examples=300, deadline=None)
@example(data="a\r\nb", event=None, id=None, retry=None)  # CRLF is one line break
@example(data="\r", event=None, id=None, retry=None)  # a lone CR is one too
@example(data=" lead", event=" lead", id=" lead", retry=None)  # leading spaces survive
@example(data="a\u2028b\x85c\x0c", event=None, id=None, retry=None)  # not line breaks
@example(data="\ufeffx", event=None, id=None, retry=None)  # a BOM in data is data
@given(
    data=st.text(),
    event=st.none() | single_line,
    id=st.none() | ids,
    retry=st.none() | st.integers(min_value=0, max_value=10**640 - 1),
)
def test_encode_then_parse_round_trips(
    data: str, event: str | None, id: str | None, retry: int | None
) -> None:
    events, parser = read_back(encode(data, event=event, id=id, retry=retry))
    assert events == [Event(event or "message", as_read(data), id or "")]
    assert parser.retry == retry


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.text(max_size=20), st.none() | single_line, st.none() | ids),
        max_size=6,
    ),
    heartbeat=st.text(max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_a_stream_of_events_round_trips_in_any_chunking(
    messages: list[tuple[str, str | None, str | None]], heartbeat: str, cuts: list[int]
) -> None:
    # Events with heartbeat comments between them, cut at arbitrary points.
    body = b"".join(comment(heartbeat) + encode(d, event=e, id=i) for d, e, i in messages)
    bounds = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
    parser = SSEParser()
    events = [ev for a, b in pairwise(bounds) for ev in parser.feed(body[a:b])]
    expected, last_id = [], ""
    for data, event, id_ in messages:
        last_id = last_id if id_ is None else id_  # an event without id inherits it
        expected.append(Event(event or "message", as_read(data), last_id))
    assert events + parser.close() == expected
    assert parser.last_event_id == last_id
