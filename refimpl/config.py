"""Server-wide settings, filled from ``refimpl serve`` flags (``cli.py``).

Per-request ``"simulate"`` knobs override the simulated-model defaults held
here (DESIGN §2).  Everything has a default so ``create_app()`` with no
arguments gives the embedded demo server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Simulate

#: The one model name the embedded server serves (``GET /v1/models``).
DEFAULT_MODEL = "refimpl-sim"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    # Connections the kernel queues on the listening socket until the server
    # accepts them (listen(2)'s backlog; the kernel caps it at
    # net.core.somaxconn).  hypercorn's default, 100, overflowed under a
    # burst of 500 clients: SYNs dropped and retransmitted a second later,
    # connections failing at set-up; 1,024 overflowed under 2,000 clients
    # connecting at once (uvicorn's default is 2,048).
    backlog: int = 4096
    # TLS (tls.py): the server's certificate chain and key, and the CA a
    # client must trust when --tls made them; None: plain HTTP (h2c too).
    certfile: str | None = None
    keyfile: str | None = None
    ca: str | None = None
    model_name: str = DEFAULT_MODEL
    simulate: Simulate = field(default_factory=Simulate)
    # Seconds of silence after which an SSE stream sends ": ping" (lesson 08).
    heartbeat: float = 15.0
    # A generation still running this many seconds after it was accepted
    # fails with code "timeout" (lesson 07); None: no limit.
    generation_timeout: float | None = None
    # Seconds a client should wait before retrying a 503 (overloaded,
    # shutting down): sent as Retry-After and retry-after-ms (lesson 07).
    retry_after: float = 1.0
    # Graceful shutdown (patterns/shutdown.py): seconds the running
    # generations may take to finish before they are ended with
    # server_shutdown (SSE) / close 1001 (WebSocket).
    drain_timeout: float = 10.0
    # Admission control (lesson 09): generations the model runs at once ...
    max_active: int = 1024
    # ... and up to this many more wait for a slot, in order, with
    # heartbeats meanwhile (lesson 09); past both: 429 too_many_requests.
    max_queue: int = 256
    # Largest request body accepted, in bytes (HTTP 413 above it).
    max_body_bytes: int = 1 << 20
    # Most tokens the writer puts into one write when the model is ahead.
    batch_tokens: int = 64
    # A write that has waited this many seconds (the client stopped reading)
    # gets the client dropped and its generation cancelled with
    # ``stall_timeout``: an SSE chunk on HTTP/1.1 or a WebSocket frame (the
    # watchdog in ``hypercorn_patches.py``); None: never.
    stall_timeout: float | None = 30.0
    # Backpressure (patterns/backpressure.py, lesson 10): what the model does
    # while a client reads slower than it writes, unless a request says:
    # "pause" (wait for the client), "coalesce" (run up to
    # coalesce_max_tokens ahead, send what is pending as one chunk) or
    # "disconnect" (end a client slower than min_tokens_per_s for
    # slow_window seconds with error slow_consumer).
    backpressure: str = "pause"
    coalesce_max_tokens: int = 4096
    min_tokens_per_s: float = 10.0
    slow_window: float = 10.0
    # WebSocket keepalive (lesson 03): a ping frame every ``ws_ping_interval``
    # seconds (None: no pings); a peer that sends nothing back within
    # ``ws_ping_timeout`` seconds is dead and is dropped (``ping_timeout``).
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float = 20.0
    # Largest WebSocket message accepted from a client; bigger: close 1009.
    ws_max_message_bytes: int = 1 << 20
    # region: resume-settings
    # Resumable streams (patterns/resume.py, lesson 11).  A request with
    # "resumable": true keeps generating this many seconds after its last
    # reader left, waiting for one to come back (GET .../{id}/events);
    # with no reader by then it is cancelled (client_disconnect).
    resume_grace: float = 30.0
    # Its events stay replayable this many seconds after it ended.
    resume_window: float = 300.0
    # Memory bounds: the events one generation may log (past it the
    # generation ends with error resume_log_full) ...
    resume_max_events: int = 10_000
    # ... and the generations kept replayable at once in this process
    # (the oldest finished one is forgotten first; all running: 429).
    resume_max_generations: int = 500
    # Where the replay log lives: None, this process's memory; or
    # "redis://HOST:PORT/DB", Redis Streams shared by every process
    # (redis_store.py), so a client resumes on any of them.
    store: str | None = None
    # endregion: resume-settings
    # region: production-settings
    # A real model upstream (upstream.py, lesson 14): the base URL of an
    # OpenAI-compatible server ("http://127.0.0.1:11434/v1" for Ollama);
    # None: the simulated model.
    upstream: str | None = None
    # The environment variable that holds the upstream's API key (sent as
    # "Authorization: Bearer ..."); None: no key.
    upstream_key_env: str | None = None
    # The model asked of the upstream; None: the first one its /v1/models lists.
    upstream_model: str | None = None
    # Seconds the upstream may send nothing at all (no token, no comment)
    # before its stream fails with upstream_timeout; a model that takes long
    # to its first token but heartbeats (refimpl, behind a proxy) is alive.
    upstream_timeout: float = 60.0
    # API keys a client must present on every protocol (REFIMPL_API_KEY, one
    # key or a comma-separated list); empty: no key needed.
    api_keys: tuple[str, ...] = ()
    # Paths answered without a key even when keys are set (a trailing "*"
    # matches any path that starts so): the demo page and its scripts, which
    # are no secret and which a <script src> cannot fetch with a key, and
    # the metrics for Prometheus (auth.py).
    public_paths: tuple[str, ...] = ("/", "/static/*", "/metrics")
    # Limits, each with its own clear error (lesson 14): messages per
    # request and characters of prompt (400), the largest max_tokens (400),
    # streams one client address may run at once (429) ...
    max_messages: int = 1000
    max_prompt_chars: int = 1_000_000
    max_tokens_limit: int = 32_768
    max_streams_per_client: int = 64
    # ... connections one client address may hold open (past it: closed at
    # once, unread; 0: no cap), and the seconds a client may take to send its
    # request headers and its body (408, close): hypercorn_limits.py.
    max_connections_per_client: int = 256
    header_timeout: float = 10.0
    # Seconds an idle keep-alive connection stays open for its next request;
    # longer than clients' own pool expiry (httpx: 5 s), so that the client,
    # not the server, closes it (hypercorn_limits.py says why).
    keep_alive_timeout: float = 20.0
    body_timeout: float = 30.0
    # Origins a browser page may call this server from (CORS); empty: none
    # but the server's own; "*": any.
    cors_origins: tuple[str, ...] = ()
    # endregion: production-settings
