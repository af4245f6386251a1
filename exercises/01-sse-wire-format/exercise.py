"""Exercise 01: an SSE reader that survives the network (lesson 01).

Write ``read_events``.  It gets the body of an event stream the way the
network delivered it, a list of byte chunks cut anywhere, and returns the
events the body completes, as ``(type, data)`` pairs, by the rules of
WHATWG HTML §9.2.5-9.2.6 (lesson 01, "The rules, from the spec"), leaving
out the byte order mark, ``id`` and ``retry`` (``SSEParser`` does those):

* a line ends at CRLF, at a lone LF or at a lone CR -- also when a read
  ends between the CR and the LF of one CRLF;
* an empty line dispatches: the event's data is its ``data`` values joined
  with "\\n" (no ``data`` line: no event), its type the last ``event``
  value, or "message";
* ``name: value`` loses ONE leading space of the value, a line with no colon
  is a name with an empty value, a line that starts with ":" is a comment,
  and any other name is ignored;
* an event the body ends before its empty line is discarded.

What is here now is lesson 01's "usual first repair" (``line_buffered_data``
in ``refimpl/examples/naive_sse.py``): it survives an event cut across two
reads, and nothing else.  Run ``make exercise N=01`` to see what it gets
wrong, then replace it with your own reader.
"""

from __future__ import annotations

from collections.abc import Iterable

from refimpl.examples.naive_sse import line_buffered_data


def read_events(chunks: Iterable[bytes]) -> list[tuple[str, str]]:
    # Replace this line with your reader.
    return [("message", data) for data in line_buffered_data(chunks)]
