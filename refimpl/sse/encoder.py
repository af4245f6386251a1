"""Write server-sent events: the inverse of :mod:`refimpl.sse.parser`.

Strategy
--------
An encoder is easy to write and easy to get subtly wrong, so this one is
defined by a single promise: whatever ``encode`` accepts, the parser (and a
browser's EventSource) reads back unchanged.  The WHATWG HTML Standard,
§9.2.5 "Parsing an event stream" and §9.2.6 "Interpreting an event stream",
fixes what the promise can cover:

* A field is one line, and CR, LF and CRLF all end a line.  Multi-line data
  is therefore sent as several ``data:`` lines, which the reader joins with
  LF.  The reader cannot tell which of the three line endings was used, so
  CR and CRLF inside ``data`` come back as LF.  That loss is inherent to
  the format; we document it instead of hiding it.
* ``event`` and ``id`` have no such escape hatch: a line break inside them
  would end the field early and let the rest of the value be read as a new
  field (an injection, if the value came from a user).  We refuse them.  An
  ``id`` containing NUL is silently ignored by every conforming reader, so
  it is refused as well rather than being sent and lost.
* The reader removes exactly one space after the colon.  We always write
  ``name: value`` with that one space, so a value that itself starts with a
  space keeps it.

Like the parser this module does no I/O: it returns UTF-8 bytes and the
caller writes them wherever it likes.  Lesson 01 explains it next to the
parser; lesson 08 uses :func:`comment` for heartbeats.
"""

from __future__ import annotations

from refimpl.sse.parser import MAX_RETRY_DIGITS

__all__ = ["comment", "encode"]


def _lines(text: str) -> list[str]:
    """Split ``text`` at CRLF, lone CR and lone LF, like an SSE reader does.

    ``str.splitlines()`` would be wrong here: it also breaks at U+2028,
    U+0085, form feed and others, which a reader treats as ordinary text,
    and it drops a trailing empty line that the data must keep.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _check_single_line(name: str, value: str) -> None:
    """Refuse a value that a ``name:`` field could not carry intact."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF: {value!r}")


# region: sse-encode
def encode(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,  # the field is called "id" on the wire
    retry: int | None = None,
) -> bytes:
    """Return one complete event, ending with the blank line that dispatches it.

    ``encode("a\\nb", event="delta", id="7")`` gives::

        id: 7
        event: delta
        data: a
        data: b
        <blank line>

    ``None`` leaves a field out.  ``id=""`` is different: it is sent, and it
    resets the reader's last event ID.  ``event=""`` reads back as the
    default type ``"message"``.  Raises ``ValueError`` for values the format
    cannot carry (see the module docstring) and for a ``retry`` that is
    negative or too long for readers; ``TypeError`` if it is not an ``int``.
    """
    fields: list[str] = []
    if id is not None:
        _check_single_line("id", id)
        if "\0" in id:
            raise ValueError(f"SSE id must not contain NUL (readers ignore it): {id!r}")
        fields.append(f"id: {id}\n")
    if event is not None:
        _check_single_line("event", event)
        fields.append(f"event: {event}\n")
    if retry is not None:
        # bool is an int subclass, but "retry: True" is not a number.
        if not isinstance(retry, int) or isinstance(retry, bool):
            raise TypeError(f"SSE retry must be an int, got {type(retry).__name__}")
        if retry < 0:
            raise ValueError(f"SSE retry must be >= 0, got {retry}")
        # Readers ignore absurdly long values (see the parser's constant).
        if retry >= 10**MAX_RETRY_DIGITS:
            raise ValueError(f"SSE retry must have at most {MAX_RETRY_DIGITS} digits")
        fields.append(f"retry: {retry}\n")
    # One data line per line of text; the reader joins them back with LF.
    # Empty data still needs one (empty) data line, or nothing is dispatched.
    fields.extend(f"data: {line}\n" for line in _lines(data))
    # The blank line is what makes the reader dispatch the event.
    fields.append("\n")
    return "".join(fields).encode("utf-8")


# endregion: sse-encode


def comment(text: str) -> bytes:
    """Return ``text`` as comment lines (``: text``), which readers ignore.

    A comment dispatches nothing and changes no state, which makes it the
    right heartbeat: ``comment("ping")`` is ``b": ping\\n"``.  Multi-line
    text becomes one comment line per line.
    """
    return "".join(f": {line}\n" for line in _lines(text)).encode("utf-8")
