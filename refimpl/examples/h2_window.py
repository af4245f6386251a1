"""A raw HTTP/2 client that chooses, stream by stream, when to give bytes back (lesson 06).

Strategy
--------
HTTP/2 client libraries hide flow control.  httpx (through httpcore) and
grpcio give a stream's bytes back to the server, with a WINDOW_UPDATE frame,
as they take them in, so from outside they cannot show what a server does
when *one* stream's reader stops while its siblings on the same connection
go on.  This client can.  The frames are the sans-IO ``h2`` library's (the
same python-hyper family as lesson 01's ``h11``: bytes in, events out); the
socket and one decision are ours.  For every DATA frame it receives it
either

* gives the bytes back to the stream *and* the connection
  (``acknowledge_received_data``), which is what a reader that keeps up
  does, or, for a stream it *holds*,
* gives them back to the connection only.  The connection's window stays
  open, so the siblings keep flowing, and the held stream's own window
  (65,535 bytes to start with, RFC 9113 §6.9.2) is spent once and stays
  shut, as if its reader had stopped, until :meth:`H2Client.reopen`.

It also does the two other things a library would not let the lesson show:
:meth:`H2Client.reset` ends one stream with RST_STREAM(CANCEL) (RFC 9113
§6.4) and keeps the connection, and ``enable_push=False`` sends
SETTINGS_ENABLE_PUSH = 0 in the first SETTINGS frame, as browsers do
(§6.5.2).  Every event is kept with a timestamp, pushed streams included.

:func:`hold_one_stream` is lesson 06's flow-control experiment: one held
stream and one sibling on one connection, the held generation's token count
(``GET /v1/debug/generations/{id}``) and this process's RSS sampled while it
is held.  The RSS is the server's only when the server runs in this process,
as a notebook's does (``refimpl.notebook.start_server``).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import trio

from ..benchload import memory_kib


@dataclass
class Stream:
    """What one stream has brought back so far."""

    headers: dict[str, str] = field(default_factory=dict)  # the final response's
    informational: list[dict[str, str]] = field(default_factory=list)  # 1xx, e.g. a 103
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # END_STREAM arrived: the whole response is here
    reset: int | None = None  # the error code of the server's RST_STREAM, if it sent one
    held: int | None = None  # while held: bytes not given back to the stream
    pushed_by: int | None = None  # a pushed stream: the stream whose PUSH_PROMISE made it
    promised: dict[str, str] = field(default_factory=dict)  # ... and the request it promised


class H2Client:
    """One HTTP/2 connection on a trio socket; ``h2`` keeps its state."""

    def __init__(
        self, sock: trio.SocketStream, authority: str, *, window: int | None = None, enable_push: bool = True
    ) -> None:
        self.sock, self.authority = sock, authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        # Our first SETTINGS frame says whether we take pushes (a browser: no)
        # and, if asked, each stream's initial window (RFC 9113 §6.5.2).
        codes = h2.settings.SettingCodes
        ours = {codes.ENABLE_PUSH: int(enable_push)}
        if window is not None:
            ours[codes.INITIAL_WINDOW_SIZE] = window
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=ours)
        self.conn.initiate_connection()
        if window is not None:  # the connection's window is not a setting: raise it by a WINDOW_UPDATE
            self.conn.increment_flow_control_window(window - self.conn.inbound_flow_control_window)
        self.streams: dict[int, Stream] = {}
        self.events: list[tuple[float, h2.events.Event]] = []  # (trio.current_time(), event)

    def request(self, method: str, path: str, body: Any = None, *, hold: bool = False) -> int:
        """Start a request (a JSON ``body`` if given); its stream id.  A held
        stream's bytes go back to the connection only: its window closes."""
        stream_id = self.conn.get_next_available_stream_id()
        data = b"" if body is None else json.dumps(body).encode()
        headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", self.authority)]
        if data:
            headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        self.conn.send_headers(stream_id, headers, end_stream=not data)
        if data:
            self.conn.send_data(stream_id, data, end_stream=True)
        self.streams[stream_id] = Stream(held=0 if hold else None)
        return stream_id

    async def until(self, done: Callable[[], bool]) -> None:
        """Send what is pending, then read and answer until ``done()``.
        Cancel-safe: cancelled, it stops between two reads."""
        await self._send()
        while not done():
            data = await self.sock.receive_some(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in self.conn.receive_data(data):
                self.events.append((trio.current_time(), event))
                self._handle(event)
            await self._send()

    async def _send(self) -> None:
        # h2 forgets the bytes it hands us, so they must all go out: a cancel
        # half-way would leave h2 and the server disagreeing about the windows.
        with trio.CancelScope(shield=True):
            await self.sock.send_all(self.conn.data_to_send())

    # region: h2-give-back
    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, h2.events.DataReceived):
            stream.body += event.data
            n = event.flow_controlled_length
            if stream.held is None:  # a reader that keeps up: both windows (RFC 9113 §6.9)
                self.conn.acknowledge_received_data(n, event.stream_id)
            else:  # a held stream: the connection's window only
                stream.held += n
                self.conn.increment_flow_control_window(n)
        elif isinstance(event, h2.events.ResponseReceived):
            stream.headers = dict(event.headers)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream.informational.append(dict(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.reset = event.error_code
        elif isinstance(event, h2.events.PushedStreamReceived):  # a PUSH_PROMISE (RFC 9113 §8.4)
            self.streams[event.pushed_stream_id] = Stream(
                pushed_by=event.parent_stream_id, promised=dict(event.headers)
            )

    # endregion: h2-give-back

    def reopen(self, stream_id: int) -> None:
        """Give a held stream its bytes back (the next :meth:`until` sends
        the WINDOW_UPDATE) and read it normally from now on."""
        stream = self.streams[stream_id]
        self.conn.increment_flow_control_window(stream.held, stream_id=stream_id)
        stream.held = None

    async def reset(self, stream_id: int) -> None:
        """End one stream now, RST_STREAM(CANCEL); the connection stays."""
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self._send()


@asynccontextmanager
async def connect(
    url: str, *, window: int | None = None, enable_push: bool = True
) -> AsyncIterator[H2Client]:
    """An :class:`H2Client` on a new TCP connection to ``url`` (``http://``:
    h2c with prior knowledge, RFC 9113 §3.3); closed on the way out."""
    authority = url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        yield H2Client(sock, authority, window=window, enable_push=enable_push)


@dataclass
class HeldRun:
    """One run of :func:`hold_one_stream`.  Times are seconds since the
    held stream's response headers arrived."""

    id: str  # the held stream's generation
    window: int  # the bytes of it the client let in: its initial window
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, tokens made, RSS growth KiB)
    sibling_ended: float | None = None  # when the sibling's stream ended, if it did
    sibling_body: bytes = b""
    received: int = 0  # bytes of the held stream received
    trace: dict[str, Any] = field(default_factory=dict)  # the held generation's, after the reset

    @property
    def tokens(self) -> int:
        """Tokens the held generation had made at the last sample."""
        return self.samples[-1][1]

    @property
    def growth_mib(self) -> float:
        return max(kib for _, _, kib in self.samples) / 1024


def _sse_body(content: str, tokens: int) -> dict[str, Any]:
    simulate = {"tokens": tokens, "ttft_ms": 0, "itl_ms": 0}
    messages = [{"role": "user", "content": content}]
    return {"model": "refimpl-sim", "messages": messages, "stream": True, "simulate": simulate}


# region: hold-one-stream
async def hold_one_stream(
    url: str,
    seconds: float,
    *,
    held_tokens: int = 100_000_000,
    sibling_tokens: int = 2_000,
    every: float = 0.1,
    window: int | None = None,
) -> HeldRun:
    """Two SSE streams on one connection at ``itl_ms`` 0: A, held (its window,
    ``window`` bytes or the default 65,535, is never given back), and its
    sibling B, read to the end.  For ``seconds`` sample A's tokens made and
    this process's RSS; then reset A."""
    async with connect(url, window=window) as client, httpx.AsyncClient(base_url=url, timeout=30) as debug:
        a = client.request("POST", "/v1/chat/completions", _sse_body("A", held_tokens), hold=True)
        b = client.request("POST", "/v1/chat/completions", _sse_body("B", sibling_tokens))
        await client.until(lambda: "x-request-id" in client.streams[a].headers)
        start, baseline = trio.current_time(), memory_kib(os.getpid())[0]
        run = HeldRun(
            client.streams[a].headers["x-request-id"], client.conn.local_settings.initial_window_size
        )
        async with trio.open_nursery() as reading:
            reading.start_soon(client.until, lambda: False)  # every stream, all the time
            while (now := trio.current_time() - start) < seconds:
                made = (await debug.get(f"/v1/debug/generations/{run.id}")).json()["completion_tokens"]
                run.samples.append((now, made, memory_kib(os.getpid())[0] - baseline))
                if client.streams[b].ended and run.sibling_ended is None:
                    run.sibling_ended = now
                await trio.sleep(every)
            reading.cancel_scope.cancel()
        run.received, run.sibling_body = len(client.streams[a].body), bytes(client.streams[b].body)
        await client.reset(a)  # RST_STREAM: the writer waiting for A's window learns it is gone
        with trio.fail_after(10):  # the server may run anywhere: all we can do is ask
            while not (trace := (await debug.get(f"/v1/debug/generations/{run.id}")).json())["finished"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        run.trace = trace
    return run


# endregion: hold-one-stream
