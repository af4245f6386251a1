"""One generation from a real model upstream: a task and a channel (lesson 14).

Strategy
--------
An :class:`UpstreamStream` is the :class:`~refimpl.backend.TokenStream` that
``upstream.py``'s backend gives the engine for one generation: it sends the
request (``upstream_chunks.request_body``), reads the answer's bytes, and
lets the sans-IO :class:`~refimpl.upstream_chunks.ChunkDecoder` say what
they mean.

Why a task and a channel here, when the engine's whole design is *pull*
(DESIGN §4)?  The simulated model makes a token when asked; an upstream
pushes bytes whenever its socket has them.  So one task per stream reads
the socket and puts each token into a memory channel, and ``next()``
receives from it.  That one shape gives the engine what it needs:

* ``next()`` is cancel-safe, because receiving from a trio channel is (a
  cancelled receive takes nothing), so the engine's ``wait(timeout)`` can
  give up for a heartbeat and lose no token (lesson 08);
* ``poll()`` is ``receive_nowait()``: whatever the socket already brought
  leaves in one write;
* the channel is *bounded* (:data:`CHANNEL_TOKENS`).  When our client reads
  slowly, the channel fills, the task stops reading the upstream's socket,
  the kernel's receive buffer fills, TCP's window closes, and the upstream's
  own writes block: backpressure reaches the real model (lesson 10), and our
  memory per stream stays at one channel plus one socket read.

Beginnings.  :meth:`UpstreamStream.opened` returns once the upstream has
answered 200 with an event stream, or raises what it answered instead, so
that the engine can hold our own status line until then
(``Generation.opened``): a refusal is then a status, not an error event.

Endings.  The engine calls :meth:`UpstreamStream.close` whenever the
generation ends; if the upstream has not finished, that cancels the task,
and httpx closes a connection whose response was not read to the end, so
the upstream sees its client leave and stops generating (its trace:
``cancelled(client_disconnect)``).  If it has finished, the task reads the
body's last bytes first, so that the connection goes back to httpx's pool
for the next request.  Every failure ends as one last item in the channel
with an ``upstream_*`` code, never as an exception out of the app's nursery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import trio

from .backend import ModelError, ModelRequest, count_tokens
from .upstream_chunks import ChunkDecoder, Finished, not_a_stream, refusal, request_body

if TYPE_CHECKING:
    from .upstream import UpstreamModel

# region: upstream-bound
#: Tokens a stream may hold between the upstream's socket and our writer.
#: The writer takes up to ``--batch-tokens`` (64) in one write, so 64 lets a
#: whole write's worth wait while the writer is busy, and no more: past it
#: the task stops reading and TCP pushes back on the upstream (see above).
CHANNEL_TOKENS = 64
# endregion: upstream-bound
#: Bytes of an upstream's error response we read to quote its message.
ERROR_BYTES = 4096


class UpstreamStream:
    """One generation: the task that reads the upstream, and the channel."""

    def __init__(self, model: UpstreamModel, request: ModelRequest) -> None:
        self._model = model
        self._body = request_body(request)
        # Ours until the upstream's usage chunk says otherwise.
        self.prompt_tokens = count_tokens(request.prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.upstream_id: str | None = None  # the upstream's own generation id
        self._send, self._receive = trio.open_memory_channel[str | Finished | Exception](CHANNEL_TOKENS)
        self._scope = trio.CancelScope()  # close() may come before the task runs
        self._over = False
        self._answered = False  # its status line came: a broken connection is mid-stream
        # Set once the upstream's stream started, or once it cannot (opened()).
        self._opened = trio.Event()
        self._refused: Exception | None = None
        self._finished = False  # it sent its ending ([DONE]): nothing to stop

    # region: upstream-next
    async def next(self) -> str | None:
        if self._over:
            return None
        try:
            item = await self._receive.receive()  # cancel-safe: a cancelled receive takes nothing
        except trio.EndOfChannel:
            item = ModelError("upstream_error", "The upstream request was stopped before it finished.")
        return self._take(item)

    def poll(self) -> str | None:
        if self._over:
            return None
        try:
            item = self._receive.receive_nowait()
        except trio.WouldBlock:
            return None
        except trio.EndOfChannel:
            item = ModelError("upstream_error", "The upstream request was stopped before it finished.")
        return self._take(item)

    @property
    def buffered(self) -> int:
        """Tokens waiting in the channel: at most :data:`CHANNEL_TOKENS`."""
        return self._receive.statistics().current_buffer_used

    def close(self) -> None:
        """The generation ended (done, failed, cancelled): close the request
        now; the upstream sees its client leave and stops generating.  Not
        once the upstream finished by itself: then the task is reading the
        last bytes of the body, to keep the connection (``_read_to_the_end``)."""
        if not self._finished:
            self._scope.cancel()

    # endregion: upstream-next

    # region: upstream-opened
    async def opened(self) -> None:
        """Return once the upstream answered 200 with an event stream (or
        this stream was closed first); raise its :class:`ModelError` if it
        answered anything else or could not be reached.  Cancel-safe: it
        only watches, so the engine may give up on it (``Generation.opened``)."""
        await self._opened.wait()
        if self._refused is not None:
            raise self._refused

    # endregion: upstream-opened

    def _take(self, item: str | Finished | Exception) -> str | None:
        if isinstance(item, str):
            self.completion_tokens += 1
            return item
        self._over = True
        if isinstance(item, Finished):
            self.finish_reason = item.finish_reason
            usage = item.usage or {}
            for name in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(name), int):
                    setattr(self, name, usage[name])
            return None
        self.finish_reason = "error"
        raise item

    # region: upstream-task
    async def run(self) -> None:
        """The task: relay the upstream's stream into the channel.  Whatever
        happens ends as one last item, never as an exception out of the
        app's nursery (which would stop the whole server)."""
        self._model.in_flight.add(self)
        try:
            with self._send, self._scope:
                try:
                    await self._relay()
                    return
                except httpx.TimeoutException:
                    last: Exception = ModelError(
                        "upstream_timeout", f"The upstream sent nothing for {self._model.timeout:g} s."
                    )
                except httpx.ConnectError as err:  # refused, unknown host: it may come back
                    last = ModelError("upstream_unavailable", f"The upstream cannot be reached ({err}).")
                except httpx.HTTPError as err:  # reset, closed, not HTTP at all
                    when = "mid-stream" if self._answered else "before it answered"
                    last = ModelError(
                        "upstream_error", f"The connection to the upstream broke {when} ({err!r})."
                    )
                except Exception as bug:  # a bug of ours: the engine logs it (internal_error)
                    last = bug
                await self._end(last)
        finally:
            self._opened.set()  # closed before it answered: nothing to wait for
            self._model.in_flight.discard(self)

    async def _relay(self) -> None:
        model = self._model
        async with model.client.stream(
            "POST", f"{model.url}/chat/completions", json=self._body, headers=model.headers
        ) as resp:
            self._answered = True
            if resp.status_code != 200:
                return await self._end(refusal(resp.status_code, await _start_of(resp), model.key_env))
            if (wrong := not_a_stream(resp.headers.get("content-type", ""))) is not None:
                return await self._end(wrong)
            self.upstream_id = resp.headers.get("x-request-id")
            self._opened.set()
            decoder, body = ChunkDecoder(), resp.aiter_bytes()
            async for data in body:
                items = decoder.feed(data)
                self.upstream_id = self.upstream_id or decoder.upstream_id
                for item in items:
                    if isinstance(item, str):
                        await self._put(item)
                        continue
                    await self._end(item)  # the ending: always the last item
                    if isinstance(item, Finished):
                        await _read_to_the_end(body)
                    return
            await self._end(decoder.end_of_body())

    async def _end(self, last: Finished | Exception) -> None:
        """The stream's one ending, into the channel (and for ``opened()``)."""
        if not self._opened.is_set() and isinstance(last, Exception):
            self._refused = last  # it failed before its stream started
        self._opened.set()
        # No checkpoint between the ending entering the channel and this flag
        # when it fits (_put), so a close() that follows it sees the flag.
        await self._put(last)
        self._finished = isinstance(last, Finished)

    # endregion: upstream-task

    async def _put(self, item: str | Finished | Exception) -> None:
        """Into the channel; wait only while it is full.  Not a checkpoint
        per token: a whole socket read (hundreds of tokens from a fast
        upstream) goes in before the writer wakes, and leaves in one write
        (``poll()``), the way the simulated model's ready tokens do."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send.send(item)  # full: we stop reading the socket (backpressure)


async def _start_of(resp: httpx.Response) -> bytes:
    """The first :data:`ERROR_BYTES` of an error answer's body, to quote."""
    raw = b""
    async for part in resp.aiter_bytes():
        raw += part
        if len(raw) >= ERROR_BYTES:
            break
    return raw


async def _read_to_the_end(body: AsyncIterator[bytes]) -> None:
    """After ``[DONE]``: read the body's end (HTTP/1.1's last chunk) so that
    httpx puts the connection back in its pool.  A response closed before
    its end closes its connection, and every request then paid for a new
    one: a TCP handshake (on loopback ~1 ms of TTFT, measured; to a remote
    upstream a round trip, plus TLS's) and a socket left in TIME_WAIT.
    Data after ``[DONE]``, or a broken connection, only costs us the
    connection; a body that never ends is cut by ``--upstream-timeout``."""
    try:
        async for _ in body:
            return  # more data after [DONE]: not worth keeping
    except httpx.HTTPError:
        pass
