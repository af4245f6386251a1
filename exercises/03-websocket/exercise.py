"""Exercise 03: say "stop" on a WebSocket, and keep the socket (lesson 03).

Complete ``chat_and_cancel(ws, simulate, cancel_after)``: one turn on an
open socket to ``/v1/ws/chat`` (lesson 03, "The messages"):

1. send a ``chat`` message (``{"type": "chat", "messages": [...],
   "simulate": simulate}``);
2. read the server's messages, keeping the ``content`` of each ``token``;
3. once ``cancel_after`` token messages have arrived, send
   ``{"type": "cancel"}`` (``cancel_after=None``: never);
4. return ``(contents, final)``, where ``final`` is the message that ended
   the turn (``done``, ``cancelled`` or ``error``), as the server sent it.

The socket must be ready for the next turn when you return: a turn is any
number of ``token`` messages followed by exactly one final message.

What is here now sends the cancel, and then believes it worked.  Run
``make exercise N=03`` and see what that costs the next turn.
"""

from __future__ import annotations

import json
from typing import Any

from trio_websocket import WebSocketConnection


async def chat_and_cancel(
    ws: WebSocketConnection, simulate: dict[str, Any], cancel_after: int | None
) -> tuple[list[str], dict[str, Any]]:
    chat = {"type": "chat", "messages": [{"role": "user", "content": "Hello"}], "simulate": simulate}
    await ws.send_message(json.dumps(chat))
    contents: list[str] = []
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] != "token":
            return contents, message
        contents.append(message["content"])
        if len(contents) == cancel_after:
            await ws.send_message(json.dumps({"type": "cancel"}))
            return contents, {"type": "cancelled"}  # we asked it to stop, so it stopped?
