"""Exercise 03, a solution: say "stop" on a WebSocket, and keep the socket.

The task is in ``../exercise.py``.  A cancel is a request, not an ending:
the turn ends with the server's final message, which may still be ``done``
(the cancel crossed the last token on the wire, and a cancel with nothing
running is ignored: lesson 03, "Push on it" 1).  Reading on until that
message is what keeps the next turn's messages the next turn's.
"""

from __future__ import annotations

import json
from typing import Any

from trio_websocket import WebSocketConnection

FINAL = {"done", "cancelled", "error"}


async def chat_and_cancel(
    ws: WebSocketConnection, simulate: dict[str, Any], cancel_after: int | None
) -> tuple[list[str], dict[str, Any]]:
    chat = {"type": "chat", "messages": [{"role": "user", "content": "Hello"}], "simulate": simulate}
    await ws.send_message(json.dumps(chat))
    contents: list[str] = []
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] in FINAL:
            return contents, message
        contents.append(message["content"])
        if len(contents) == cancel_after:
            await ws.send_message(json.dumps({"type": "cancel"}))  # and read on
