"""The SSE wire format in sixteen byte strings (lesson 01).

Each entry is what a server might send and the events a conforming reader
(WHATWG HTML §9.2.5-§9.2.6) dispatches for it, once the body has ended.
Lesson 01 includes the table; ``tests/test_lesson_examples.py`` feeds every
entry to :class:`~refimpl.sse.SSEParser` whole, byte by byte and cut at every
point, and to the naive readers of ``naive_sse.py``; the lesson 01 notebook
prints the table with the naive readers' answers beside the parser's.
"""

from __future__ import annotations

from ..sse import Event

# region: wire-tour
TOUR: list[tuple[bytes, list[Event]]] = [
    # -- a blank line dispatches; data lines are joined with LF -----------
    (b"data: hi\n\n", [Event(data="hi")]),
    (b"data: hi\n", []),  # body ended before the blank line: discarded
    (b"data: a\ndata: b\n\n", [Event(data="a\nb")]),  # one event, two lines
    (b"data: hi\n\n\n\n", [Event(data="hi")]),  # extra blank lines: nothing
    # -- "name: value"; ONE optional space after the colon is removed -----
    (b"data:hi\n\n", [Event(data="hi")]),
    (b"data:  hi\n\n", [Event(data=" hi")]),
    (b"data\n\n", [Event(data="")]),  # no colon: the whole line is the name
    (b"foo: bar\ndata: hi\n\n", [Event(data="hi")]),  # unknown field: ignored
    (b": ping\n\n", []),  # a comment, then a blank line with no data
    # -- only CRLF, lone CR and LF end a line; one leading BOM is dropped -
    (b"data: hi\r\n\r\n", [Event(data="hi")]),
    (b"data: hi\r\r", [Event(data="hi")]),
    (b"\xef\xbb\xbfdata: hi\n\n", [Event(data="hi")]),
    (b"data: a\xe2\x80\xa8b\n\n", [Event(data="a\u2028b")]),  # U+2028 is just data
    # -- event names the type; id sticks to every later event -------------
    (b"event: error\ndata: {}\n\n", [Event(type="error", data="{}")]),
    (
        b"id: 7\ndata: a\n\ndata: b\n\n",
        [Event(data="a", last_event_id="7"), Event(data="b", last_event_id="7")],
    ),
    (b"retry: 2500\ndata: hi\n\n", [Event(data="hi")]),  # sets parser.retry
]
# endregion: wire-tour
