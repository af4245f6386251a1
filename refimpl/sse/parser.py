"""A sans-IO parser for ``text/event-stream`` bodies (server-sent events).

Strategy
--------
The parser is a small state machine that is handed bytes and hands back
events; it never reads a socket, never sleeps and never raises on input.
Whoever owns the connection (an httpx client, a browser page, a test) calls
``feed(chunk)`` with whatever the network delivered and ``close()`` when the
body ends.  Lesson 01 walks through this file top to bottom.

It implements the WHATWG HTML Standard, "Server-sent events":

* §9.2.5 "Parsing an event stream" says how bytes become lines: decode the
  whole body as UTF-8 (a broken sequence becomes U+FFFD, one byte order mark
  at the very start is dropped), then cut it into lines at CRLF, at a lone LF
  or at a lone CR.  Everything else about the format is about lines.
* §9.2.6 "Interpreting an event stream" says what each line means: a blank
  line dispatches the event built so far, a line starting with ":" is a
  comment, any other line is a ``name: value`` field that updates one of
  three buffers (data, event type, last event ID) or the reconnection time.

The hard part is not the rules, it is that the rules are stated for the
*whole* stream while we see it in arbitrary pieces.  A chunk may end in the
middle of a UTF-8 character, inside the byte order mark, inside a line, or
between the CR and the LF of one CRLF.  The test suite checks that every
way of cutting the same bytes gives the same events; the comments below
point at the piece of state that makes each of those cuts harmless.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["Event", "SSEParser"]

# int() refuses to parse more than 4300 digits by default, because the work
# grows with the square of the length (a server could stall its clients);
# an application may lower that limit to 640 but no further.  A retry value
# longer than this, in milliseconds far beyond the age of the universe, is
# ignored like any other invalid one, so that feed() can never raise.
MAX_RETRY_DIGITS = 640


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: what a browser hands to ``onmessage``.

    ``last_event_id`` is the stream's last event ID *at dispatch time*; it
    is inherited from earlier events when this one carried no ``id:`` field.
    """

    type: str = "message"
    data: str = ""
    last_event_id: str = ""


class SSEParser:
    """Turn the bytes of one event stream into :class:`Event` objects.

    Public state, both read-only by convention:

    ``last_event_id``
        The spec's "last event ID string": the value a reconnecting client
        sends as ``Last-Event-ID``.  It changes only when a blank line is
        processed (§9.2.6, first step of dispatch), so an ``id:`` inside an
        event that was cut off before its blank line never shows up here —
        which is exactly right for resuming: that event was never delivered.
    ``retry``
        The latest valid ``retry:`` value in milliseconds, or ``None`` if
        the stream never sent one.  Unlike the buffers it takes effect as
        soon as its line is read, even if the event is later discarded.
    """

    def __init__(self) -> None:
        # Bytes -> text.  The incremental decoder keeps the first bytes of a
        # multi-byte character that a chunk cut in half and finishes it on
        # the next feed; "replace" gives U+FFFD like the WHATWG decoder.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The BOM rule applies to the first decoded character only, however
        # many feeds it takes to get there (its 3 bytes may come one by one).
        self._at_stream_start = True
        # Text of the line being read, kept as pieces so that a huge line
        # arriving in many small chunks is joined once, not once per chunk.
        self._partial: list[str] = []
        # True when the last character seen was a CR.  That CR already ended
        # a line; if the next character is LF it is the second half of the
        # same CRLF and must not end a second (empty!) line.
        self._after_cr = False
        # The three buffers of §9.2.6.  Data lines are kept as a list: the
        # spec appends value + LF per line and strips the final LF at
        # dispatch, which is the same as joining the values with LF.
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self._closed = False
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume the next piece of the body; return the events it completed."""
        if self._closed:
            raise RuntimeError("SSEParser.feed() called after close()")
        text = self._decoder.decode(chunk)
        events: list[Event] = []
        for line in self._split_lines(text):
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[Event]:
        """Signal the end of the body; return the events that completes.

        §9.2.5 discards whatever is pending when the stream ends: a last line
        with no line ending and an event with no blank line after it are both
        dropped, never dispatched.  A final lone CR needs no special care: it
        was already treated as a line ending when it arrived (see
        ``_split_lines``), so ``data: x\\r\\r`` has dispatched before
        ``close()`` is called.  The result is therefore always an empty list;
        it is a list so that callers can write ``events += parser.close()``
        and never have to special-case the end of the stream.
        """
        if self._closed:
            return []
        self._closed = True
        # Flushing the decoder can only yield U+FFFD for a truncated
        # character, and that character belongs to the unfinished last line,
        # which is discarded together with the unfinished event.
        self._decoder.decode(b"", final=True)
        self._partial.clear()
        self._data.clear()
        self._event_type = ""
        return []

    # region: sse-line-splitting
    def _split_lines(self, text: str) -> list[str]:
        """Return the lines that ``text`` completes (without their endings).

        §9.2.5: a line ends at CRLF, at an LF not preceded by CR, or at a CR
        not followed by LF.  Do not reach for ``str.splitlines()``: it also
        splits at U+2028, U+0085, form feed and five more characters that
        are ordinary data in an event stream.
        """
        if not text:
            # The chunk only held part of a UTF-8 character (or was empty):
            # nothing to do, and in particular ``_after_cr`` must survive.
            return []
        if self._at_stream_start:
            self._at_stream_start = False
            # Only one BOM, only at the start: a second one is data.  (The
            # text is never empty here, see above; it may become empty.)
            if text[0] == "\ufeff":
                text = text[1:]
        if self._after_cr and text[:1] == "\n":
            # The LF that completes a CRLF split across two chunks.
            text = text[1:]
        # A CR at the end of this text ends a line right now, whether or not
        # an LF follows.  Handling it eagerly (instead of holding it back to
        # peek at the next chunk) means an event ended by "\r\r" is delivered
        # immediately rather than when the next bytes happen to arrive.
        self._after_cr = text.endswith("\r")
        if "\r" not in text and "\n" not in text:
            # Fast path for the middle of a long line: just remember it.
            if text:
                self._partial.append(text)
            return []
        # With CRLF and then lone CR rewritten as LF, one split finds every
        # line ending; the replace order matters ("\r\n" must become one LF).
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if self._partial:
            # The first line started in an earlier chunk.
            self._partial.append(lines[0])
            lines[0] = "".join(self._partial)
            self._partial.clear()
        # The last piece has no line ending yet ("" if text ended in one).
        tail = lines.pop()
        if tail:
            self._partial.append(tail)
        return lines

    # endregion: sse-line-splitting

    def _process_line(self, line: str) -> Event | None:
        """Apply §9.2.6 to one complete line; return an event if one is due."""
        if not line:
            return self._dispatch()
        if line[0] == ":":
            # A comment.  Servers send ": ping" to keep proxies from timing
            # out an idle connection; the client ignores it.
            return None
        # region: sse-field-rules
        # The field name is everything before the first colon and the value
        # everything after it, minus ONE leading space ("data:  x" keeps " x").
        # A line with no colon at all is a field name with an empty value.
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            # Each data line adds a line to the payload (see _dispatch).
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            # An id containing NUL is ignored as a whole: it could not be
            # sent back in a Last-Event-ID header.  An empty id is allowed and
            # resets the last event ID.
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # Only ASCII digits count.  str.isdigit() alone is not enough: it
            # accepts "²" (int() raises) and "٣" (int() reads 3, the spec
            # says ignore).  Empty, signed, spaced or "10s" values: ignored.
            # The spec sets no upper bound; Python's int() does, and raises
            # past it (see MAX_RETRY_DIGITS).  Leading zeros do not change
            # the number, so they do not count.
            digits = value.lstrip("0") or "0"
            if len(digits) <= MAX_RETRY_DIGITS:
                self.retry = int(digits)
        # Any other field name is ignored, so the format can grow new fields.
        # endregion: sse-field-rules
        return None

    # region: sse-dispatch
    def _dispatch(self) -> Event | None:
        """A blank line was read: hand over the event built so far, if any."""
        # First, before anything else, the stream's last event ID takes the
        # buffer's value -- even if no event follows.  The buffer itself is
        # kept, so later events without an id: field inherit it.
        self.last_event_id = self._id_buffer
        if not self._data:
            # No data line since the last dispatch (e.g. only "event:" or
            # "id:" lines, or two blank lines in a row): nothing to deliver.
            self._event_type = ""
            return None
        # Joining with LF is the spec's "append value and LF per line, then
        # remove the final LF", done in one step.
        event = Event(
            type=self._event_type or "message",
            data="\n".join(self._data),
            last_event_id=self.last_event_id,
        )
        # The data and type buffers describe one event only.
        self._data.clear()
        self._event_type = ""
        return event

    # endregion: sse-dispatch
