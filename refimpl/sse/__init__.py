"""Server-sent events without I/O: a parser and an encoder.

Both halves follow the WHATWG HTML Standard, §9.2.5-§9.2.6 ("Parsing an
event stream", "Interpreting an event stream").  Nothing in this package
touches a socket or an event loop -- it imports no trio, quart, httpx or
asyncio, and a test checks that -- so the same code serves the server, the
Python client, the benchmarks and the lesson 01 notebook.

    >>> from refimpl.sse import SSEParser, encode
    >>> parser = SSEParser()
    >>> parser.feed(encode("hello\\nworld", event="delta", id="1"))
    [Event(type='delta', data='hello\\nworld', last_event_id='1')]
"""

from refimpl.sse.encoder import comment, encode
from refimpl.sse.parser import Event, SSEParser

__all__ = ["Event", "SSEParser", "comment", "encode"]
