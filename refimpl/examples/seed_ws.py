"""The WebSocket loop most tutorials show, rebuilt to run here.  Broken.

The usual handler (the seed article's is FastAPI): accept, then forever read
one JSON request, send the model's tokens for it one ``{"type": "token"}``
message at a time, then a ``{"type": "done"}`` with a token count, and catch
the framework's "disconnected" exception to stop quietly.  This is that loop
on Quart-Trio, with the model reached through a ``generate_stream`` helper
as in the article, so it runs on our server and the trace shows what it did.
Lesson 03 puts it beside ``protocols/websocket_chat.py``.

What it gets wrong, each proved by ``tests/test_websocket_seed.py``:

1. **It reads only between answers.**  A ``{"type": "cancel"}`` sent while
   tokens stream waits, unread, until the answer is finished: the model runs
   to the end (the trace says ``done``, not ``cancelled``).  Then the cancel
   is read as the next request; it has no ``messages``, the handler raises,
   and the socket closes with no word of why.
2. **It never tells the model that the client left.**  On quart-trio the
   handler *is* cancelled when the socket closes (Quart's receive task does
   it; on Starlette nothing notices until the next send fails), but nothing
   ends the generation: its trace stops at ``first_token`` for good and the
   active-generations gauge never comes down.  With a real backend the GPU
   would keep writing an answer nobody reads.
3. **Any error ends the conversation.**  A model failure mid-answer, a
   message that is not JSON, a binary frame: the exception leaves the loop,
   the socket closes, and the client gets no error message.
4. **``done`` has one number, called ``total_tokens``**, which is really
   the completion count; a client cannot bill or budget with it.

And it has no keepalive, no stall timeout and no size limit of its own.

The second route here, :func:`register_send_timeout`, is the stall timeout
people add first: ``trio.move_on_after`` around ``websocket.send``.  It
never fires.  hypercorn writes to the socket inside a *shielded* cancel
scope (DESIGN §4), so while the client does not read, the deadline passes
and nothing happens; when the client reads again the write completes and
the ``with`` block ends without passing another checkpoint, so the cancel
that was due is never delivered at all.  the watchdog in ``hypercorn_patches.py`` times
the writes one layer down instead.

Nothing in ``refimpl`` imports this module; tests and lesson 03 do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import trio
import trio.lowlevel
from quart import Quart, websocket

from ..engine import FINISHED, Engine
from ..model import ModelRequest, Simulate

PATH = "/seed/ws/chat"
SEND_TIMEOUT_PATH = "/broken/ws/send-timeout"


class SeedModel:
    """What the article calls ``model``: it streams tokens and knows nothing
    of sockets.  Underneath, a generation of our engine, so it is traced."""

    def __init__(self, engine: Engine, defaults: Simulate) -> None:
        self.engine = engine
        self.defaults = defaults

    async def generate_stream(self, data: dict[str, Any]) -> AsyncIterator[str]:
        request = ModelRequest(
            messages=tuple((m["role"], m["content"]) for m in data["messages"]),
            simulate=replace(self.defaults, **data.get("simulate", {})),
        )
        gen = self.engine.start(request, "seed-ws")
        while (tokens := await gen.wait()) is not FINISHED:
            for token in tokens:
                yield token


def register(app: Quart) -> None:
    """Add the seed's route at :data:`PATH` to an app from ``create_app``."""
    model = SeedModel(app.extensions["refimpl.engine"], app.config["REFIMPL"].simulate)

    # region: seed-loop
    @app.websocket(PATH)
    async def websocket_chat() -> None:
        await websocket.accept()
        while True:
            data = await websocket.receive_json()
            token_count = 0
            async for token in model.generate_stream(data):
                token_count += 1
                await websocket.send_json({"type": "token", "content": token})
            await websocket.send_json({"type": "done", "usage": {"total_tokens": token_count}})

    # endregion: seed-loop


def register_send_timeout(app: Quart, seconds: float) -> list[float]:
    """Add a route at :data:`SEND_TIMEOUT_PATH` that streams 64 KiB messages
    and means to give up on a client that takes ``seconds`` to accept one.
    Returns a list that gets the loop-clock time of each timeout it caught."""
    caught: list[float] = []
    block = "x" * 65536

    # region: send-timeout
    @app.websocket(SEND_TIMEOUT_PATH)
    async def stream_with_a_send_timeout() -> None:
        await websocket.accept()
        while True:
            with trio.move_on_after(seconds) as timer:
                await websocket.send(block)  # stuck while the client does not read
            if timer.cancelled_caught:  # "too slow: give up" -- but when?
                caught.append(trio.current_time())
                return
            await trio.lowlevel.checkpoint()  # stands in for waiting on the model

    # endregion: send-timeout

    return caught
