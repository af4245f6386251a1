"""The ``refimpl`` command line: every flag of ``serve`` and ``chat``, and the
:class:`~refimpl.config.Config` that ``serve``'s flags make.

``cli.py`` runs the commands; this module only says what they accept, each
flag with its default and a line of help (``--help`` shows them all), so the
two read apart: what a user can set here, what happens with it there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import Config
from .model import Simulate
from .patterns.backpressure import POLICIES


def serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming server on the simulated model")
    d, s = Config(), Simulate()
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on (0: any free port)")
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=1,
        help="server processes sharing the port (workers.py); each keeps its own generations,"
        " traces, /metrics and queue",
    )
    p.add_argument(
        "--backlog",
        metavar="N",
        type=int,
        default=d.backlog,
        help="connections the kernel queues until the server accepts them; the kernel caps it"
        f" at net.core.somaxconn ({_somaxconn()} here)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS, HTTP/2 by ALPN, with a certificate for 127.0.0.1 from a throw-away local CA"
        " (tls.py; the welcome says which file to trust)",
    )
    p.add_argument("--certfile", default=None, help="TLS with your own certificate chain (PEM)")
    p.add_argument("--keyfile", default=None, help="and its private key (PEM)")
    # A worker of --workers N serves the socket its parent bound (workers.py).
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ttft-ms", type=float, default=s.ttft_ms, help="delay before the first token")
    p.add_argument("--itl-ms", type=float, default=s.itl_ms, help="delay between tokens")
    p.add_argument("--tokens", type=int, default=s.tokens, help="tokens per answer")
    p.add_argument("--heartbeat", type=float, default=d.heartbeat, help="seconds of silence before ': ping'")
    p.add_argument(
        "--max-concurrent",
        "--max-active",
        dest="max_active",
        metavar="N",
        type=int,
        default=d.max_active,
        help="generations the model runs at once; more wait in the queue",
    )
    p.add_argument(
        "--max-queue",
        metavar="N",
        type=int,
        default=d.max_queue,
        help="generations that may wait for a slot (heartbeats meanwhile); more get 429",
    )
    p.add_argument(
        "--generation-timeout",
        type=float,
        default=0,
        help="fail a generation still running after this many seconds with code 'timeout' (0: never)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="on Ctrl-C/SIGTERM, seconds running generations may take to finish before they are ended",
    )
    p.add_argument(
        "--retry-after",
        type=float,
        default=d.retry_after,
        help="seconds a client should wait before retrying a 429 or 503 (Retry-After)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=d.stall_timeout,
        help="SSE and WebSocket: drop a client when one write waited this long (0: never)",
    )
    p.add_argument(
        "--backpressure",
        choices=POLICIES,
        default=d.backpressure,
        help="what the model does while a client reads slower than it writes"
        ' (a request\'s "backpressure" field overrides it)',
    )
    p.add_argument(
        "--coalesce-max-tokens",
        metavar="N",
        type=int,
        default=d.coalesce_max_tokens,
        help="coalesce: most tokens the model runs ahead of a slow client",
    )
    p.add_argument(
        "--min-tokens-per-s",
        type=float,
        default=d.min_tokens_per_s,
        help="disconnect: a client behind and slower than this ...",
    )
    p.add_argument(
        "--slow-window",
        type=float,
        default=d.slow_window,
        help="disconnect: ... for this many seconds is ended with slow_consumer",
    )
    p.add_argument(
        "--ws-ping-interval",
        type=float,
        default=d.ws_ping_interval,
        help="seconds between WebSocket pings (0: no pings)",
    )
    p.add_argument(
        "--ws-ping-timeout",
        type=float,
        default=d.ws_ping_timeout,
        help="drop a WebSocket peer that answers no ping for this many seconds",
    )
    p.add_argument(
        "--ws-max-message-bytes",
        type=int,
        default=d.ws_max_message_bytes,
        help="largest WebSocket message accepted (bigger: close 1009)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=d.batch_tokens,
        help="most ready tokens written at once when the model is ahead (1: one write per token)",
    )
    p.add_argument(
        "--resume-grace",
        type=float,
        default=d.resume_grace,
        help="resumable requests: seconds a generation runs on with no reader before it is cancelled",
    )
    p.add_argument(
        "--resume-window",
        type=float,
        default=d.resume_window,
        help="resumable requests: seconds a finished generation stays replayable",
    )
    p.add_argument(
        "--resume-max-events",
        metavar="N",
        type=int,
        default=d.resume_max_events,
        help="resumable requests: most events one generation logs (past it: error resume_log_full)",
    )
    p.add_argument(
        "--resume-max-generations",
        metavar="N",
        type=int,
        default=d.resume_max_generations,
        help="resumable requests: most generations kept replayable in one process",
    )
    p.add_argument(
        "--store",
        metavar="URL",
        default=d.store,
        help="where resumable streams are logged: redis://HOST:PORT/DB (shared by every"
        " process behind a proxy); default: this process's memory",
    )
    _production_flags(p, d)
    p.add_argument("--model-name", default=d.model_name, help="the one model name served")
    p.add_argument("--quiet", action="store_true", help="no access log (one line per request)")


def _production_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """A real model, keys, limits, timeouts, CORS (lesson 14)."""
    g = p.add_argument_group("production (lesson 14)")
    g.add_argument(
        "--upstream",
        metavar="URL",
        default=d.upstream,
        help="stream from this OpenAI-compatible server (its base URL, e.g. http://127.0.0.1:11434/v1)"
        " instead of the simulated model",
    )
    g.add_argument(
        "--upstream-key-env",
        metavar="VAR",
        default=d.upstream_key_env,
        help="the environment variable holding the upstream's API key",
    )
    g.add_argument(
        "--upstream-model",
        metavar="NAME",
        default=d.upstream_model,
        help="the upstream model to ask for (default: the first it lists)",
    )
    g.add_argument(
        "--upstream-timeout",
        metavar="S",
        type=float,
        default=d.upstream_timeout,
        help="fail an upstream stream that sends nothing for this many seconds (upstream_timeout)",
    )
    g.add_argument(
        "--public-path",
        action="append",
        metavar="PATH",
        default=None,
        help="a path answered without a key when REFIMPL_API_KEY is set (repeatable, replaces the"
        f" default; a trailing * matches a prefix; default: {' '.join(d.public_paths)})",
    )
    g.add_argument(
        "--max-messages",
        metavar="N",
        type=int,
        default=d.max_messages,
        help="most messages in one request (400 above)",
    )
    g.add_argument(
        "--max-prompt-chars",
        metavar="N",
        type=int,
        default=d.max_prompt_chars,
        help="most characters of prompt in one request (400 above)",
    )
    g.add_argument(
        "--max-tokens-limit",
        metavar="N",
        type=int,
        default=d.max_tokens_limit,
        help="the largest max_tokens a request may ask for (400 above)",
    )
    g.add_argument(
        "--max-streams-per-client",
        metavar="N",
        type=int,
        default=d.max_streams_per_client,
        help="generations one client address may run at once (429 above; 0: no cap; behind a proxy every client has its address)",
    )
    g.add_argument(
        "--max-connections-per-client",
        metavar="N",
        type=int,
        default=d.max_connections_per_client,
        help="connections one client address may hold open (more: closed at once, unread; 0: no cap)",
    )
    g.add_argument(
        "--header-timeout",
        metavar="S",
        type=float,
        default=d.header_timeout,
        help="seconds a client may take to send its request headers (then 408, closed)",
    )
    g.add_argument(
        "--body-timeout",
        metavar="S",
        type=float,
        default=d.body_timeout,
        help="seconds a client may take to send its request body (then 408, closed)",
    )
    g.add_argument(
        "--keep-alive-timeout",
        metavar="S",
        type=float,
        default=d.keep_alive_timeout,
        help="seconds an idle keep-alive connection waits for its next request (longer than clients' own, httpx: 5)",
    )
    g.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        action="append",
        default=None,
        help="an origin a browser page may call from (repeatable; * for any)",
    )


def _somaxconn() -> str:
    try:
        return Path("/proc/sys/net/core/somaxconn").read_text().strip()
    except OSError:  # not Linux
        return "see sysctl kern.ipc.somaxconn"


def chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="stream one answer and print timings")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--model", default=Config().model_name, help="the model to ask for")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--tokens", type=int, default=None, help="simulate: tokens to write")
    p.add_argument("--itl-ms", type=float, default=None, help="simulate: delay between tokens")
    p.add_argument("--ttft-ms", type=float, default=None, help="simulate: delay before the first token")
    p.add_argument(
        "--protocol",
        choices=("sse", "ws", "grpc"),
        default="sse",
        help="SSE (POST /v1/chat/completions), WebSocket (/v1/ws/chat) or gRPC (refimpl.v1.ChatService, grpcio)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    sim = Simulate(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens)
    return Config(
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        certfile=args.certfile,
        keyfile=args.keyfile,
        model_name=args.model_name,
        simulate=sim,
        heartbeat=args.heartbeat,
        max_active=args.max_active,
        max_queue=args.max_queue,
        generation_timeout=args.generation_timeout or None,
        retry_after=args.retry_after,
        drain_timeout=args.drain_timeout,
        batch_tokens=args.batch_tokens,
        stall_timeout=args.stall_timeout or None,
        backpressure=args.backpressure,
        coalesce_max_tokens=args.coalesce_max_tokens,
        min_tokens_per_s=args.min_tokens_per_s,
        slow_window=args.slow_window,
        ws_ping_interval=args.ws_ping_interval or None,
        ws_ping_timeout=args.ws_ping_timeout,
        ws_max_message_bytes=args.ws_max_message_bytes,
        resume_grace=args.resume_grace,
        resume_window=args.resume_window,
        resume_max_events=args.resume_max_events,
        resume_max_generations=args.resume_max_generations,
        store=args.store,
        upstream=args.upstream,
        upstream_key_env=args.upstream_key_env,
        upstream_model=args.upstream_model,
        upstream_timeout=args.upstream_timeout,
        api_keys=api_keys_from_env(),
        public_paths=tuple(args.public_path) if args.public_path is not None else Config.public_paths,
        max_messages=args.max_messages,
        max_prompt_chars=args.max_prompt_chars,
        max_tokens_limit=args.max_tokens_limit,
        max_streams_per_client=args.max_streams_per_client,
        max_connections_per_client=args.max_connections_per_client,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        cors_origins=tuple(args.cors_origin or ()),
    )


def api_keys_from_env() -> tuple[str, ...]:
    """``REFIMPL_API_KEY``: one key, or several separated by commas."""
    raw = os.environ.get("REFIMPL_API_KEY", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """``--help`` of every command and subcommand shows each default."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
