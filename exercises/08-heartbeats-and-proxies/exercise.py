"""Exercise 08: a client that hears the heartbeat (lesson 08).

Complete ``listen(client, url, body, idle_timeout)``: stream ``body`` from
``{url}/v1/chat/completions`` and return a :class:`Heard` with

* ``text``: the answer (content chunks, up to ``data: [DONE]``);
* ``pings``: how many heartbeat comments (``: ping``) arrived.

and give up -- raise ``TimeoutError`` (or let ``httpx.ReadTimeout`` or
``trio.TooSlowError`` out) -- when *nothing at all* arrives for
``idle_timeout`` seconds.  A ping is something: a stream that heartbeats
more often than ``idle_timeout`` must never time out, however long the
model thinks.  (httpx has a read timeout of its own, 5 s by default, which
the ``client`` the check passes in has switched off.)

What is here now reads the answer with ``SSEParser``, which hides comments,
as it should (WHATWG §9.2.6): so it counts no pings, and it waits forever.
Run ``make exercise N=08``.  Lesson 08, "Seeing a heartbeat from the
client", shows one way to see the lines the parser skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from refimpl.sse import SSEParser


@dataclass
class Heard:
    text: str = ""
    pings: int = 0


async def listen(client: httpx.AsyncClient, url: str, body: dict[str, Any], idle_timeout: float) -> Heard:
    heard = Heard()
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    return heard
                for choice in json.loads(event.data)["choices"]:
                    heard.text += choice["delta"].get("content") or ""
    return heard
