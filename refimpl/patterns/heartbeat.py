"""Heartbeats: keep a quiet stream alive through proxies, and notice dead peers.

Strategy
--------
A model can be silent for a long time: a long prompt to read before the first
token, a queue, a tool call, a slow decode.  Everything between the server
and the client counts that silence.  A reverse proxy or load balancer closes
a connection on which nothing has moved for its *idle timeout*: nginx's
``proxy_read_timeout`` is 60 s by default, an AWS Application Load Balancer's
idle timeout 60 s, Cloudflare's proxy read timeout 100 s.  The client then
sees its stream end in the middle, with no error and no ``[DONE]``.  The cure
is to send *something* that every client ignores, before any timer can fire:
a heartbeat.  Lesson 08 shows a real nginx cutting a silent stream and
keeping a heartbeating one.

**When.**  SSE: after ``--heartbeat`` seconds (default 15) with nothing sent,
whatever the reason: before the first token, or between tokens.
The writer asks the engine for the next token with that silence as its
timeout, and ``Generation.pull`` answers :data:`~refimpl.engine.SILENT` when
it passes (one cancel scope per wait serves the heartbeat, the client's
cancel and ``--generation-timeout`` together, so a heartbeat costs no timer
of its own).  WebSocket: a ping every ``--ws-ping-interval`` seconds, busy or
not, because its ping does a second job (below).

**What each protocol sends, and what a browser sees of it.**

* **SSE: a comment line**, ``: ping``.  WHATWG HTML §9.2.6: a line that
  starts with a colon is ignored by every conforming parser, so it dispatches
  nothing.  It is sent only between events, followed by a blank line: a
  conforming parser needs none, but the many hand-written readers that split
  the stream on ``"\\n\\n"`` would otherwise glue the ping onto the next event.
  A browser ``EventSource`` never shows comments to the page; a ``fetch``
  reader sees the bytes and must skip them.  It is data like any other, so it
  resets every idle timer between the two ends, proxies included.
* **WebSocket: a Ping control frame** (RFC 6455 §5.5.2).  The peer must answer
  with a Pong (§5.5.3), and every client library and browser does so on its
  own.  The browser's ``WebSocket`` API shows neither ping nor pong to the
  page: JavaScript can neither send a ping nor see one.  A text message would
  keep proxies awake too, but it would be part of *our* message protocol,
  which every client would have to know to ignore; a ping is below it.
  Because the peer *must* answer, a ping also proves the peer is alive: a
  half-open connection (a laptop lid closed, Wi-Fi lost, no FIN ever sent)
  looks exactly like a quiet one, and only an unanswered ping tells them
  apart (:func:`keep_websocket_alive`).  SSE has no way back from the client,
  so a dead SSE reader is found only when TCP gives up on the writes it
  cannot deliver (an SSE stall timeout is lesson 10's work).
* **gRPC: a chunk with only the generation's id**, no content
  (:func:`grpc_heartbeat`).  HTTP/2 has PING frames (RFC 9113 §6.7), which
  the peer's library answers like a WebSocket pong, and grpcio clients send
  them; but a PING lives on one hop, and behind a proxy the silence that
  counts is the upstream's: nginx cut a silent call at ``grpc_read_timeout``
  however often the client pinged (``tests/test_nginx.py``).  An empty
  DATA frame would do for nginx, but an ASGI server drops an empty body
  write, and a message is what every hop passes on.  Like the SSE comment,
  the reader sees it and skips it: a chunk without content adds nothing.

Both kinds are written in each generation's trace as ``heartbeat`` events and
counted in ``refimpl_heartbeats_total`` (a WebSocket ping only while a
generation runs on that socket), so lesson 08 plots pings between tokens.
The next WebSocket ping is due ``interval`` seconds after the peer last
answered, not after the last ping: a slow pong delays the schedule, it
never shortens the time a peer has to answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from ..sse import comment

if TYPE_CHECKING:
    from ..engine import Generation
    from ..v1.chat_pb2 import ChatChunk

# region: sse-heartbeat
#: The SSE heartbeat: a comment line, then a blank line for naive readers.
SSE_PING = comment("ping") + b"\n"


def sse_heartbeat(gen: Generation) -> bytes:
    """What the SSE writer sends when ``pull()`` said ``SILENT``."""
    gen.heartbeat()
    return SSE_PING


# endregion: sse-heartbeat


# region: grpc-heartbeat
def grpc_heartbeat(gen: Generation) -> ChatChunk:
    """What the gRPC writers send when ``pull()`` said ``SILENT``."""
    from ..v1.chat_pb2 import ChatChunk  # protobuf: no I/O, but not for the SSE-only reader

    gen.heartbeat()
    return ChatChunk(id=gen.id)


# endregion: grpc-heartbeat

#: The payload of our WebSocket pings (RFC 6455 §5.5.2 allows up to 125 bytes;
#: the pong echoes it back).
WS_PING_PAYLOAD = b"refimpl"


class PingTarget(Protocol):
    """What :func:`keep_websocket_alive` needs from a connection."""

    def listen(self) -> trio.Event:
        """A fresh event, set as soon as any bytes arrive from the peer."""

    def send_ping(self, payload: bytes) -> None:
        """Start writing a ping frame; must not wait for the write."""


# region: ws-keepalive
async def keep_websocket_alive(conn: PingTarget, interval: float, timeout: float) -> None:
    """Ping every ``interval`` seconds; return when the peer is dead.

    Any bytes from the peer count as a sign of life, not only the pong: a
    busy client whose pong is queued behind its messages is alive.  The ping
    is sent without waiting for the write, so a ping stuck behind a stalled
    write cannot stop the clock that will notice it.
    """
    while True:
        await trio.sleep(interval)
        heard = conn.listen()
        conn.send_ping(WS_PING_PAYLOAD)
        with trio.move_on_after(timeout):
            await heard.wait()  # the pong, or any other frame
            continue
        return  # nothing at all came back within `timeout`: a dead peer


# endregion: ws-keepalive
