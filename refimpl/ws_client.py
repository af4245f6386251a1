"""Our own WebSocket chat client, on ``trio-websocket`` (lesson 03).

Strategy
--------
The SSE client (``client.py``) opens one HTTP request per answer; this one
opens one socket and keeps it for every turn, which is the point of a
WebSocket.  It shows the client's half of the protocol in
``protocols/ws_messages.py``:

1. :func:`connect` opens the socket (``http://`` URLs become ``ws://`` with
   the ``/v1/ws/chat`` path) and gives a :class:`WSChat`;
2. :meth:`WSChat.chat` sends one ``chat`` message and yields a
   :class:`WSEvent` per message received: ``token`` events, then exactly one
   final event, ``done``, ``cancelled`` or ``error``, which ends the turn.  A
   failed turn is an event, not an exception, because the socket is still
   good for the next one;
3. :meth:`WSChat.cancel` may be called while a turn streams (from the loop
   over its events, or from another task); the turn then ends with
   ``cancelled`` -- or with ``done`` if the answer finished first.

Keepalive needs no code here: the server pings and ``trio-websocket`` answers
each ping with a pong on its own.  If the socket closes mid-turn the turn
raises :class:`~refimpl.client.StreamError` with the close code, as the SSE
client does for a stream that was cut short.  Timestamps come from
``trio.current_time()``, so ``refimpl chat --protocol ws`` can print TTFT.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from .client import StreamError, api_key_headers

#: What :func:`connect` raises when there is no server to talk to.
CONNECT_ERRORS = (HandshakeError, OSError)
FINAL = frozenset({"done", "cancelled", "error"})


@dataclass(frozen=True, slots=True)
class WSEvent:
    type: str  # "token" | "done" | "cancelled" | "error"
    at: float  # trio.current_time() when the message arrived
    content: str = ""
    id: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    reason: str | None = None  # why it was cancelled
    error: dict[str, Any] | None = None


_FIELDS = set(WSEvent.__slots__) - {"at"}  # fields a server message may fill


def ws_url(url: str) -> str:
    """``http://h:p`` → ``ws://h:p/v1/ws/chat``; a ws URL with a path is kept."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if scheme == parts.scheme and parts.path not in ("", "/") else "/v1/ws/chat"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class WSChat:
    """One open socket: many turns, one at a time."""

    def __init__(self, connection: WebSocketConnection) -> None:
        self.connection = connection

    # region: client-turn
    async def chat(
        self,
        messages: str | list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        simulate: dict[str, Any] | None = None,
    ) -> AsyncIterator[WSEvent]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        request: dict[str, Any] = {"type": "chat", "messages": messages}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if simulate is not None:
            request["simulate"] = simulate
        try:
            await self.connection.send_message(json.dumps(request))
            while True:
                message = json.loads(await self.connection.get_message())
                event = WSEvent(at=trio.current_time(), **{k: message[k] for k in _FIELDS & message.keys()})
                yield event
                if event.type in FINAL:
                    return
        except ConnectionClosed as closed:
            code, why = closed.reason.code, closed.reason.reason
            message = f"the socket closed mid-turn (code {code}{': ' + why if why else ''})"
            raise StreamError({"message": message, "code": code}) from None

    async def cancel(self) -> None:
        await self.connection.send_message('{"type":"cancel"}')

    # endregion: client-turn


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[WSChat]:
    headers = list(api_key_headers().items())  # REFIMPL_API_KEY, if set
    async with open_websocket_url(ws_url(url), extra_headers=headers) as connection:
        yield WSChat(connection)
