"""A real model upstream: stream from any OpenAI-compatible server (lesson 14).

Strategy
--------
``refimpl serve --upstream URL`` puts a real model (vLLM, llama.cpp's server,
Ollama, OpenAI) behind the same engine, so everything the simulated model
taught -- heartbeats, cancellation, backpressure, the error events -- holds
for it too.  :class:`UpstreamModel` is the :class:`~refimpl.backend.Backend`:
one shared httpx client (its connections kept between requests), the
upstream's model list, and one :class:`~refimpl.upstream_stream.UpstreamStream`
per generation, which ``POST {URL}/chat/completions`` (streamed, with
usage) and hands what the answer says to the engine.  The work is split
three ways, the way the SSE modules are: what to send and how to read the
answer -- OpenAI's Chat Completions streaming format -- is the sans-IO
``upstream_chunks.py``; moving the bytes of one stream is
``upstream_stream.py``; this module holds what the streams share.

The model list.  Our ``GET /v1/models`` is the upstream's own, fetched on
each call (and once at start-up); a request may name any model it lists
(:meth:`UpstreamModel.served`, ``backend.ModelNames``).  An upstream that
cannot be reached at start-up is a warning, not a crash: until it answers,
any name goes on to the upstream, which judges it.

Every way the upstream can fail becomes a :class:`~refimpl.backend.ModelError`
with an ``upstream_*`` code (``patterns/errors.py``): ``upstream_unavailable``
(cannot connect; its 429 or 503), ``upstream_timeout`` (not one byte for
``--upstream-timeout`` s), ``upstream_rejected`` (its other 4xx: the request
itself) and ``upstream_error`` (everything else: its 5xx, our key refused,
its error event, a broken connection, garbage).  Never a hang, never a
traceback.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
import trio

from .backend import ModelNames, ModelRequest
from .config import Config
from .patterns.errors import APIError
from .upstream_stream import UpstreamStream

log = logging.getLogger("refimpl")


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
            # Admission (--max-active, --max-queue) bounds our streams, not the pool.
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
