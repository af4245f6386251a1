"""``create_app(config)``: one Quart-Trio app, one port, every protocol.

Strategy
--------
This module only *assembles*: it builds the shared pieces (the backend, the
:class:`~refimpl.engine.Engine`, the metrics) and lets each protocol module
register its routes on the app.  The small endpoints that every protocol
shares live here too: ``GET /v1/models``, ``GET /metrics`` (Prometheus text),
``GET /v1/debug/generations/{id}`` (one generation's trace, the way tests,
lessons and notebooks observe the server), ``GET /v1/debug/generations``
(every running or queued generation, each with its trace: what holds
``refimpl_active_generations`` up), and ``GET /`` (the demo page).

Errors before a stream starts all leave through the handlers below in the
OpenAI error shape (``patterns/errors.py``): our own :class:`APIError`, the
framework's HTTP errors (404 unknown path, 405 wrong method, 413 body too
large), and, as a last resort, any unexpected exception as a 500 with no
traceback in the body.  Under ``/v1/messages`` the same errors take
Anthropic's shape instead (:func:`error_response`).

:func:`serve` runs the app on hypercorn's trio worker; the test fixture and
``refimpl serve`` both use it, so tests exercise exactly what users run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib import resources

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, g, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import access_log, auth, cors, hypercorn_limits, hypercorn_patches, limits
from .config import Config
from .engine import Engine
from .metrics import Metrics, count_sent
from .model import Backend, SimulatedModel
from .patterns.errors import APIError, request_timeout
from .patterns.resume import Store
from .patterns.shutdown import Shutdown
from .protocols import (
    anthropic_messages,
    grpc_chat,
    http2,
    openai_responses,
    resume_routes,
    sse_chat,
    websocket_chat,
)
from .protocols.http_json import json_response
from .upstream import UpstreamModel

log = logging.getLogger("refimpl")


def create_app(config: Config | None = None, backend: Backend | None = None) -> QuartTrio:
    config = config or Config()
    app = QuartTrio("refimpl")
    app.config["REFIMPL"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    # A body that stops half-way: 408 after --body-timeout (Quart's default
    # is 60 s).  Over HTTP/1.1 hypercorn_limits.py's clock, started earlier,
    # answers first and closes; this one is HTTP/2's (one stream, not the
    # connection).
    app.config["BODY_TIMEOUT"] = config.body_timeout
    engine = Engine(
        backend or (UpstreamModel(config) if config.upstream else SimulatedModel()),
        Metrics(),
        max_active=config.max_active,
        max_queue=config.max_queue,
        generation_timeout=config.generation_timeout,
        retry_after=config.retry_after,
    )
    app.extensions["refimpl.engine"] = engine
    # Lesson 14: the limits every generation passes (Engine.start), and the
    # API key every HTTP request presents (WebSocket and gRPC check theirs).
    engine.limits = limits.Limits(config, config.retry_after)
    auth.install(app, config)
    shutdown = Shutdown(engine, config.drain_timeout)
    app.extensions["refimpl.shutdown"] = shutdown

    sse_chat.register(app, engine)
    anthropic_messages.register(app, engine)  # the Anthropic dialect (lesson 14)
    openai_responses.register(app, engine)  # OpenAI's Responses dialect (lesson 14)
    # Resumable streams (lesson 11): their logs in memory, or in Redis.
    app.extensions["refimpl.resume"] = resume_store = open_store(config)
    engine.metrics.resume_logs.set_function(lambda: len(resume_store.registry.logs))
    resume_routes.register(app, engine)
    websocket_chat.register(app, engine, shutdown)
    http2.register(app)  # server push and 103 Early Hints, shown (lesson 06)
    # gRPC is not a Quart route: serve() puts connectrpc in front of the app.
    # In front of all: CORS (cors.py) and each request's client address (limits.py).
    app.extensions["refimpl.grpc"] = lambda: cors.middleware(
        limits.remember_client(grpc_chat.asgi(app, engine, config, shutdown)), config.cors_origins
    )

    @app.get("/")
    async def index() -> Response:
        page = resources.files("refimpl.static").joinpath("index.html").read_bytes()
        return Response(page, content_type="text/html; charset=utf-8")

    @app.get("/static/<name>")
    async def static_file(name: str) -> Response:
        files = resources.files("refimpl.static")
        if not name.endswith((".js", ".css")) or not files.joinpath(name).is_file():
            raise APIError(404, f"No static file '{name}'.", code="not_found")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(files.joinpath(name).read_bytes(), content_type=kind + "; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        if isinstance(engine.backend, UpstreamModel):  # lesson 14: the upstream's own list
            body = await engine.backend.list_models()
            config.model_name = engine.backend.served()
            return json_response(body)
        model = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "refimpl"}
        return json_response({"object": "list", "data": [model]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), content_type=engine.metrics.content_type)

    @app.get("/v1/debug/generations")
    async def debug_running() -> Response:
        # What holds the active gauge up, each with its trace: a generation
        # that stays here long after its client left is a leak (lesson 14).
        running = [*engine.active.values(), *engine.queued.values()]
        return json_response({"object": "list", "data": [gen.to_json() for gen in running]})

    @app.get("/v1/debug/generations/<gen_id>")
    async def debug_generation(gen_id: str) -> Response:
        gen = engine.get(gen_id)
        if gen is None:
            raise APIError(404, f"No generation with id '{gen_id}'.", code="not_found")
        return json_response(gen.to_json())

    @app.before_serving
    async def start_model_clock() -> None:
        # The simulated model's shared timer lives in the lifespan nursery.
        if isinstance(engine.backend, SimulatedModel):
            engine.backend.clock.attach(app.nursery)
        # An upstream's streams read it in tasks of this nursery, and the
        # names it serves become ours (upstream.py, lesson 14).
        if isinstance(engine.backend, UpstreamModel):
            config.model_name = await engine.backend.open(app.nursery)

    @app.before_request
    async def note_start() -> None:
        g.started = time.perf_counter()

    worker = str(os.getpid())

    @app.after_request
    async def access_line(response: Response) -> Response:
        # A request that made a generation is logged when it ends (its id is
        # in X-Request-Id); every other one now (access_log.py).
        if "X-Request-Id" not in response.headers:
            seconds = time.perf_counter() - g.get("started", time.perf_counter())
            access_log.request_done(request.method, request.path, response.status_code, seconds)
        # Which process answered: with `refimpl serve --workers N` each worker
        # keeps its own generations and metrics (workers.py), so a client
        # that gets a 404 from /v1/debug/generations/{id} can see why.
        response.headers["X-Refimpl-Worker"] = worker
        return response

    @app.after_serving
    async def stop_generations() -> None:
        # Normally the drain (patterns/shutdown.py) has ended everything by
        # now; this catches a server stopped without a shutdown trigger.
        engine.accepting = False
        engine.cancel_all("shutdown")
        if isinstance(engine.backend, UpstreamModel):  # its connections, now unused
            await engine.backend.aclose()

    @app.errorhandler(APIError)
    async def api_error(err: APIError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        status = err.code or 500
        message = {
            404: f"No route matches {request.method} {request.path}.",
            405: "This method is not allowed on this path.",
            413: f"The request body is larger than {config.max_body_bytes} bytes.",
        }.get(status, err.description or err.name)
        api = APIError(status, message, code=err.name.lower().replace(" ", "_"))
        if status == 408:  # Quart's BODY_TIMEOUT (werkzeug's RequestTimeout)
            http1 = request.http_version.startswith("1")  # HTTP/2: one stream ends, not the connection
            api = request_timeout("body", config.body_timeout, close=http1)
            if not http1:  # HTTP/1.1's are counted as they go out (hypercorn_limits.py)
                engine.metrics.request_timeouts.labels(part="body").inc()
        return error_response(api)

    @app.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unexpected error while handling a request")
        message = "The server had an error while processing your request."
        return error_response(APIError(500, message, code="internal_error"))

    return app


def error_response(err: APIError) -> Response:
    """An error before the stream, in the shape of the dialect its path
    speaks: Anthropic's under ``/v1/messages``, OpenAI's everywhere else."""
    if has_request_context() and anthropic_messages.speaks_anthropic(request.path):
        return anthropic_messages.error_response(err)
    return json_response(err.body(), err.status, err.headers())


def open_store(config: Config) -> Store:
    """Where resumable streams keep their events (``--store``)."""
    if config.store is None:
        return Store(config)
    from .redis_store import RedisStore  # coredis: only when asked for

    return RedisStore(config)


def hypercorn_config(
    host: str,
    port: int,
    backlog: int = Config.backlog,
    *,
    fd: int | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    connection_limits: hypercorn_limits.ConnectionLimits | None = None,
) -> HypercornConfig:
    """hypercorn's settings for ``host:port`` with a listen ``backlog``; or,
    given ``fd``, for a listening socket this process inherited (hypercorn's
    ``fd://`` bind: a worker of ``refimpl serve --workers N``, ``workers.py``).
    With ``certfile`` and ``keyfile``: TLS, where hypercorn offers HTTP/2 and
    HTTP/1.1 by ALPN (``tls.py``)."""
    hc = HypercornConfig()
    hc.bind = [f"{host}:{port}" if fd is None else f"fd://{fd}"]
    hc.backlog = backlog
    hc.certfile, hc.keyfile = certfile, keyfile
    hc.accesslog = None
    # hypercorn's own errors ("Error in ASGI Framework", with a traceback)
    # go to a child of refimpl's logger: silent where refimpl's is (its
    # NullHandler: a notebook's cells), on stderr under `refimpl serve`,
    # seen by the tests (the fault load counts tracebacks); None would
    # drop them.  Its INFO lines ("Running on ...") stay out.
    hc.errorlog = logging.getLogger("refimpl.hypercorn")
    hc.errorlog.setLevel(logging.WARNING)
    # HTTP/2 limits that hypercorn's defaults set for web pages, not for
    # streams (lesson 06): 100 streams per connection would queue a gRPC
    # channel's 101st call; a connection closed after 1,000 requests would
    # send a long-lived gRPC channel a GOAWAY mid-load.  (hypercorn's queue
    # of 10 ASGI messages per stream, max_app_queue_size, stays: when it is
    # full hypercorn stops reading the whole connection, so each bidi call
    # reads its client's messages in a task of its own, grpc_chat.py.)
    hc.h2_max_concurrent_streams = 1000
    hc.keep_alive_max_requests = 1_000_000
    if connection_limits is not None:  # --header-timeout, --body-timeout, --max-connections-per-client
        hypercorn_limits.configure(hc, connection_limits)
    return hc


def owning_generations(asgi: Callable, engine: Engine) -> Callable:
    """Outermost: each request (each WebSocket) ends the generations it
    started and left running, whichever protocol and middleware ran it
    (``Engine.serving``: a client that left before the body started)."""

    async def owning(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await asgi(scope, receive, send)
        with engine.serving():
            await asgi(scope, receive, send)

    return owning


async def serve(
    app: QuartTrio,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = Config.backlog,
    fd: int | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker; ``task_status`` gets the URL.

    Installs refimpl's changes to hypercorn first (``hypercorn_patches.py``:
    the write fast path unless ``REFIMPL_FASTWRITE=0`` is set in the
    environment, and the watchdog under SSE and WebSocket streams).  When ``shutdown_trigger``
    returns, the running generations are drained (``patterns/shutdown.py``)
    before hypercorn begins its own shutdown.  ``fd`` serves a listening
    socket this process inherited instead of binding ``host:port`` (a worker
    of ``refimpl serve --workers N``: ``workers.py``).
    """
    hypercorn_patches.install()
    trigger = None
    if shutdown_trigger is not None:

        async def trigger() -> None:  # hypercorn stops when this returns
            await shutdown_trigger()
            await app.extensions["refimpl.shutdown"].drain()

    # One ASGI app for every protocol: gRPC/Connect (grpc_chat.py) in front of
    # Quart.  (A lesson's own small app, examples/, has no gRPC: served as is.)
    asgi = app.extensions["refimpl.grpc"]() if "refimpl.grpc" in app.extensions else app
    # Slow and half-sent requests, connections per address (hypercorn_limits.py):
    # refimpl's own app only; one Limits per server, kept where tests can see it.
    connection_limits = None
    if "REFIMPL" in app.config:
        connection_limits = hypercorn_limits.ConnectionLimits.of(app.config["REFIMPL"])
        app.extensions["refimpl.connection_limits"] = connection_limits
    if "refimpl.engine" in app.extensions:  # every protocol's bytes pass here (metrics.py)
        if connection_limits is not None:  # its 408s and refusals, counted in /metrics
            connection_limits.metrics = app.extensions["refimpl.engine"].metrics
        asgi = count_sent(asgi, app.extensions["refimpl.engine"].metrics)
        asgi = owning_generations(asgi, app.extensions["refimpl.engine"])

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(
            asgi,
            hypercorn_config(
                host,
                port,
                backlog,
                fd=fd,
                certfile=certfile,
                keyfile=keyfile,
                connection_limits=connection_limits,
            ),
            shutdown_trigger=trigger,
            task_status=task_status,
        )

    # The store's connections (Redis) open before the first request and
    # close after the last one; opened in a lifespan hook instead, a hard
    # cancel would close them while hypercorn's tasks still ran.
    resume_store = app.extensions.get("refimpl.resume") or Store(Config())
    async with resume_store.open(), trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(binds[0])
