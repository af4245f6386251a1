"""Our own streaming client: httpx for the bytes, our SSE parser for events.

Strategy
--------
The openai SDK hides the stream behind objects; this client shows every
layer a reader needs to see once (lesson 02):

1. POST the request with ``stream: true`` and read the body as it arrives
   (``httpx`` ``aiter_raw``; no decompression or re-chunking in between);
2. feed the raw bytes to the sans-IO :class:`~refimpl.sse.SSEParser`, which
   handles every way the bytes may be split (the naive ``split("\\n")`` reader
   of lesson 01 does not);
3. turn each event into a :class:`StreamEvent`: content, the finish reason,
   usage, an ``error`` event (raised as :class:`StreamError`), and
   ``[DONE]``, which ends the stream.  A body that ends *without* ``[DONE]``
   is an error too (code ``incomplete``): the stream was cut short, whether
   the body ended cleanly or the peer closed the connection in the middle
   of it (httpx's ``RemoteProtocolError``, as when a proxy's read timeout
   cuts a chunked response: lesson 08).

Timestamps come from ``trio.current_time()``, so ``refimpl chat`` can print
TTFT and tokens per second measured at the client.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .sse import SSEParser


class StreamError(Exception):
    """The server sent an error (before or during the stream), or cut it short."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "stream failed"))
        self.error = error


@dataclass(frozen=True, slots=True)
class StreamEvent:
    at: float  # trio.current_time() when the event was parsed
    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    id: str = ""


def api_key_headers() -> dict[str, str]:
    """``Authorization: Bearer <key>`` when ``REFIMPL_API_KEY`` is set (its
    first key, if it lists several), so that ``refimpl chat`` works against a
    server started with the same variable (lesson 14)."""
    key = os.environ.get("REFIMPL_API_KEY", "").split(",")[0].strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


# region: client-stream
async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> AsyncIterator[StreamEvent]:
    body = {**body, "stream": True}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    async with client.stream("POST", endpoint, json=body, headers=api_key_headers()) as resp:
        if resp.status_code != 200:
            raise StreamError(_error_of(resp.status_code, await resp.aread()))
        parser = SSEParser()
        try:
            async for raw in resp.aiter_raw():
                for event in parser.feed(raw):
                    if event.data == "[DONE]":
                        return
                    payload = json.loads(event.data)
                    if event.type == "error" or "error" in payload:
                        raise StreamError(payload["error"])
                    yield _to_event(payload)
        except httpx.RemoteProtocolError as err:  # the peer (a proxy, say) closed mid-body
            raise _incomplete(f": {err}") from err
    raise _incomplete()


# endregion: client-stream


def _incomplete(why: str = "") -> StreamError:
    return StreamError({"message": "the stream ended without [DONE]" + why, "code": "incomplete"})


def _error_of(status: int, body: bytes) -> dict[str, Any]:
    """The OpenAI error object of a failed response, or a stand-in when the
    body is not one (a proxy's HTML 502 page, say)."""
    try:
        error = json.loads(body)["error"]
        if isinstance(error, dict):
            return error
    except (ValueError, KeyError, TypeError):
        pass
    text = body[:200].decode("utf-8", "replace")
    return {"message": f"HTTP {status}: {text}", "code": f"http_{status}"}


def _to_event(chunk: dict[str, Any]) -> StreamEvent:
    choice = chunk["choices"][0] if chunk["choices"] else {}
    delta = choice.get("delta", {})
    return StreamEvent(
        at=trio.current_time(),
        content=delta.get("content") or "",
        finish_reason=choice.get("finish_reason"),
        usage=chunk.get("usage"),
        id=chunk["id"],
    )
