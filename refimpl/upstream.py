"""A real model upstream: stream from any OpenAI-compatible server (lesson 14).

Strategy
--------
``refimpl serve --upstream URL`` puts a real model (vLLM, llama.cpp's server,
Ollama, OpenAI) behind the same engine, so everything the simulated model
taught -- heartbeats, cancellation, backpressure, the error events -- holds
for it too.  :class:`UpstreamModel` is a :class:`~refimpl.backend.Backend`
whose streams ``POST {URL}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage`` (OpenAI's Chat Completions streaming: one
``chat.completion.chunk`` per SSE ``data:`` line, a usage chunk, ``[DONE]``)
and read the answer with our own sans-IO :class:`~refimpl.sse.SSEParser`.

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

Endings.  The engine calls :meth:`UpstreamStream.close` whenever the
generation ends; it cancels the task, and httpx closes a connection whose
response was not read to the end, so the upstream sees its client leave and
stops generating (its trace: ``cancelled(client_disconnect)``).  Every way
the upstream can fail becomes a :class:`~refimpl.backend.ModelError` with
one of the ``upstream_*`` codes of ``patterns/errors.py`` -- never a hang
(``--upstream-timeout``: nothing received for that long) and never a
traceback:

======================  ===================================================
``upstream_unavailable``  connection refused or dropped before an answer;
                          its 429 or 503 (busy: try again later)
``upstream_timeout``      it sent not one byte for ``--upstream-timeout`` s
``upstream_error``        its 5xx, 401/403 (our key), ``event: error`` or a
                          ``data: {"error": ...}``, a stream cut short,
                          data that is not a JSON chunk, or no event at all
                          in :data:`GARBAGE_BYTES`
``upstream_rejected``     its other 4xx: the request itself was refused
======================  ===================================================

The status of a failure *before* the upstream's stream starts reaches our
client as a status only when ours has not started either: a non-streamed
request gets 503/504/502/400 (``sse_chat.complete``).  A streamed one
already has its 200 -- our route answers before the backend has even
connected -- so it gets the same error as the first event after the role
chunk (lesson 07's mid-stream error), with no content before it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .backend import ModelError, ModelNames, ModelRequest, count_tokens
from .config import Config
from .patterns.errors import APIError
from .sse import Event, SSEParser

log = logging.getLogger("refimpl")

# region: upstream-bound
#: Tokens a stream may hold between the upstream's socket and our writer.
#: The writer takes up to ``--batch-tokens`` (64) in one write, so 64 lets a
#: whole write's worth wait while the writer is busy, and no more: past it
#: the task stops reading and TCP pushes back on the upstream (see above).
CHANNEL_TOKENS = 64
# endregion: upstream-bound
#: Bytes the upstream may send without completing a single SSE event before
#: we call it garbage: the parser would otherwise keep an endless line.
GARBAGE_BYTES = 1 << 20
#: Bytes of an upstream's error response we read to quote its message.
ERROR_BYTES = 4096


@dataclass(frozen=True, slots=True)
class _End:
    """The upstream finished: what it said about how, and its usage."""

    finish_reason: str
    usage: dict[str, Any] | None


class UpstreamModel:
    """The backend: one shared httpx client, one task per stream."""

    def __init__(self, config: Config) -> None:
        assert config.upstream is not None
        self.url = config.upstream.rstrip("/")
        self.timeout = config.upstream_timeout
        self.default_model = config.upstream_model
        self.fallback_model = config.model_name
        self.key_env = config.upstream_key_env
        key = os.environ.get(self.key_env or "") if self.key_env else None
        if self.key_env and not key:
            log.warning("--upstream-key-env %s: that variable is not set; sending no key", self.key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        # A connect that takes this long is a dead host; a read this long
        # with no byte is a hung upstream (upstream_timeout).
        t = self.timeout
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(t, 10.0)),
            # Admission (--max-concurrent) bounds our streams, not the pool.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.models: list[dict[str, Any]] = []  # the upstream's own /models entries
        self.in_flight: set[UpstreamStream] = set()  # streams with a request open
        self._nursery: trio.Nursery | None = None

    # -- lifetime (app.py's before_serving / after_serving) ------------------
    async def open(self, nursery: trio.Nursery) -> ModelNames:
        """Start serving: stream tasks go into ``nursery``; ask the upstream
        which models it serves (a warning, not a crash, if it cannot say)."""
        self._nursery = nursery
        try:
            await self.list_models()
        except APIError as err:
            log.warning("upstream %s: %s; accepting any model name until it answers", self.url, err)
        return self.served()

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- which models (GET /v1/models) ---------------------------------------
    async def list_models(self) -> dict[str, Any]:
        """The upstream's ``GET /models`` body, remembered for :meth:`served`."""
        try:
            resp = await self.client.get(f"{self.url}/models", headers=self.headers)
            body = resp.json() if resp.status_code == 200 else None
        except httpx.HTTPError as err:
            raise APIError(
                503, f"The upstream cannot be reached ({err!r}).", code="upstream_unavailable"
            ) from None
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise APIError(
                502, f"The upstream answered GET /models with {resp.status_code}.", code="upstream_error"
            )
        self.models = [m for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        return {"object": "list", "data": self.models}

    def served(self) -> ModelNames:
        """The names requests may ask for: ``--upstream-model`` (or the first
        listed) by default, any listed one too; any at all while unknown."""
        names = [m["id"] for m in self.models]
        default = self.default_model or (names[0] if names else self.fallback_model)
        return ModelNames(default, names if names else None)

    # -- generations ---------------------------------------------------------
    def start(self, request: ModelRequest) -> UpstreamStream:
        if self._nursery is None:
            raise RuntimeError("UpstreamModel.open() was not awaited (app.py's before_serving)")
        stream = UpstreamStream(self, request)
        self._nursery.start_soon(stream.run)
        return stream


def request_body(request: ModelRequest) -> dict[str, Any]:
    """What we ask the upstream: the client's request, streamed, with usage."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [{"role": role, "content": content} for role, content in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # max_tokens, not max_completion_tokens: every OpenAI-compatible server
    # we know reads it (OpenAI's own reasoning models want the other).
    for name, value in (("max_tokens", request.max_tokens), ("temperature", request.temperature)):
        if value is not None:
            body[name] = value
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.simulate_sent:  # only if the client sent one: a refimpl upstream obeys it
        body["simulate"] = request.simulate_sent
    return body


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
        self._send, self._receive = trio.open_memory_channel[str | _End | Exception](CHANNEL_TOKENS)
        self._scope = trio.CancelScope()  # close() may come before the task runs
        self._over = False
        self._answered = False  # its status line came: a broken connection is mid-stream

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
        now; the upstream sees its client leave and stops generating."""
        self._scope.cancel()

    # endregion: upstream-next

    def _take(self, item: str | _End | Exception) -> str | None:
        if isinstance(item, str):
            self.completion_tokens += 1
            return item
        self._over = True
        if isinstance(item, _End):
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
                    last: _End | Exception = await self._relay()
                except ModelError as err:
                    last = err
                except httpx.TimeoutException:
                    last = ModelError(
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
                await self._send.send(last)
        finally:
            self._model.in_flight.discard(self)

    async def _relay(self) -> _End:
        model = self._model
        async with model.client.stream(
            "POST", f"{model.url}/chat/completions", json=self._body, headers=model.headers
        ) as resp:
            self._answered = True
            return await self._read(resp)

    # endregion: upstream-task

    async def _read(self, resp: httpx.Response) -> _End:
        if resp.status_code != 200:
            raise await self._refused(resp)
        kind = resp.headers.get("content-type", "")
        if not kind.startswith("text/event-stream"):
            raise ModelError(
                "upstream_error", f"The upstream answered {kind or 'no content type'}, not an event stream."
            )
        self.upstream_id = resp.headers.get("x-request-id")
        parser, finish, usage, garbage = SSEParser(), None, None, 0
        async for chunk in resp.aiter_bytes():
            events = parser.feed(chunk)
            garbage = 0 if events else garbage + len(chunk)
            if garbage > GARBAGE_BYTES:
                raise ModelError("upstream_error", f"The upstream sent {garbage} bytes without one event.")
            for event in events:
                if event.data == "[DONE]":
                    return _End(finish or "stop", usage)
                chunk_json = self._chunk(event)
                self.upstream_id = self.upstream_id or chunk_json.get("id")
                if isinstance(chunk_json.get("usage"), dict):
                    usage = chunk_json["usage"]
                for choice in chunk_json.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if isinstance(content, str) and content:
                        await self._put(content)
                    finish = choice.get("finish_reason") or finish
        if finish is not None:  # no [DONE], but it had said how it finished: lenient
            return _End(finish, usage)
        raise ModelError("upstream_error", "The upstream's stream ended before it finished.")

    async def _put(self, token: str) -> None:
        """Into the channel; wait only while it is full.  Not a checkpoint
        per token: a whole socket read (hundreds of tokens from a fast
        upstream) goes in before the writer wakes, and leaves in one write
        (``poll()``), the way the simulated model's ready tokens do."""
        try:
            self._send.send_nowait(token)
        except trio.WouldBlock:
            await self._send.send(token)  # full: we stop reading the socket (backpressure)

    @staticmethod
    def _chunk(event: Event) -> dict[str, Any]:
        """One event's JSON chunk; its errors (both spellings) are failures."""
        try:
            value = json.loads(event.data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ModelError(
                "upstream_error", f"The upstream sent data that is not a JSON chunk: {event.data[:80]!r}."
            )
        if event.type == "error" or "error" in value:
            err = value.get("error")
            err = err if isinstance(err, dict) else {"message": str(err)}
            raise ModelError(
                "upstream_error", f"The upstream failed mid-stream ({err.get('code')}): {err.get('message')}"
            )
        return value

    async def _refused(self, resp: httpx.Response) -> ModelError:
        """An answer other than 200, before any stream: what it means to us."""
        raw = b""
        async for part in resp.aiter_bytes():
            raw += part
            if len(raw) >= ERROR_BYTES:
                break
        try:
            said = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            said = raw[:200].decode(errors="replace")
        status = resp.status_code
        if status in (401, 403):
            where = f"${self._model.key_env}" if self._model.key_env else "no key (--upstream-key-env)"
            return ModelError("upstream_error", f"The upstream refused our key, {where} ({status}: {said}).")
        if status in (429, 503):
            return ModelError("upstream_unavailable", f"The upstream is busy ({status}: {said}).")
        if 400 <= status < 500:
            return ModelError("upstream_rejected", f"The upstream rejected the request ({status}: {said}).")
        return ModelError("upstream_error", f"The upstream failed ({status}: {said}).")
