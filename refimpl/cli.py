"""The ``refimpl`` command: ``serve``, ``chat`` and ``bench``.

``refimpl serve`` starts the server on the simulated model; ``refimpl chat
"prompt"`` streams one answer from it (printing tokens as they arrive, then
TTFT, tokens/s and usage); ``refimpl bench`` measures the cost per token
(``bench.py``).  ``python -m refimpl`` is the same command.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import httpx
import trio

from .config import Config
from .model import Simulate
from .patterns.backpressure import POLICIES


def _serve_parser(sub: argparse._SubParsersAction) -> None:
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


def _chat_parser(sub: argparse._SubParsersAction) -> None:
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


async def run_server(config: Config, quiet: bool = False, listen_fd: int | None = None) -> None:
    """One server process: alone, or a worker of ``--workers N`` serving the
    listening socket ``listen_fd`` its parent bound (``workers.py``)."""
    from .app import create_app, serve
    from .workers import announce_ready, stop_when_parent_exits

    # The server's own log lines (a failed generation, a bug) go to stderr;
    # a worker's carry its pid, the X-Refimpl-Worker of its responses.
    handler = logging.StreamHandler()
    fmt = (
        "%(asctime)s %(levelname)s %(message)s"
        if listen_fd is None
        else "%(asctime)s [%(process)d] %(levelname)s %(message)s"
    )
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logging.getLogger("refimpl").addHandler(handler)
    logging.getLogger("refimpl").setLevel(logging.INFO)
    # One line per request and per WebSocket turn (access_log.py), unless --quiet.
    logging.getLogger("refimpl.access").setLevel(logging.WARNING if quiet else logging.INFO)

    # The first SIGINT/SIGTERM starts the drain (patterns/shutdown.py); a
    # second one stops at once.
    stop = trio.Event()

    async def watch_signals(outer: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if stop.is_set():
                    logging.getLogger("refimpl").warning("second signal: stopping now")
                    outer.cancel_scope.cancel()
                stop.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(watch_signals, outer)
        if listen_fd is not None:
            outer.start_soon(stop_when_parent_exits, stop)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(
                    serve,
                    create_app(config),
                    config.host,
                    config.port,
                    backlog=config.backlog,
                    fd=listen_fd,
                    certfile=config.certfile,
                    keyfile=config.keyfile,
                    shutdown_trigger=stop.wait,
                )
            )
            if listen_fd is None:
                _print_welcome(config, url)
            else:
                announce_ready(url)  # the parent prints the welcome
        outer.cancel_scope.cancel()  # the server has stopped: stop listening for signals


#: The welcome's first words, which ``refimpl bench`` waits for (``benchload.py``).
WELCOME = "refimpl is streaming on "


def _print_welcome(config: Config, url: str, workers: int = 1) -> None:
    processes = f"{workers} workers, " if workers > 1 else ""
    print(f"{WELCOME}{url}  ({processes}Ctrl-C to stop)")
    print(f"  demo page : {url}/")
    trust = f"--cacert {config.ca} " if config.ca else ""
    print(f"  curl      : curl -N {trust}{url}/v1/chat/completions -H 'Content-Type: application/json' \\")
    print(
        f'              -d \'{{"model":"{config.model_name}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}\''
    )
    me = os.path.relpath(sys.argv[0]) if sys.argv[0].endswith("refimpl") else "python -m refimpl"
    if config.ca:  # httpx and ssl's default context both read SSL_CERT_FILE
        me = f"SSL_CERT_FILE={config.ca} {me}"
    print(f'  python    : {me} chat "Why stream tokens?" --url {url}')
    print(f'  websocket : {me} chat "Why stream tokens?" --url {url} --protocol ws')
    print(f'  gRPC      : {me} chat "Why stream tokens?" --url {url} --protocol grpc')
    print(f"  metrics   : {url}/metrics", flush=True)
    print("  dialects  : also POST /v1/messages (Anthropic) and POST /v1/responses (OpenAI Responses)")
    if config.upstream:  # upstream.py: a real model behind the same engine (lesson 14)
        print(
            f"  model     : streamed from {config.upstream} (GET {url}/v1/models lists its models)",
            flush=True,
        )
    if config.store:
        print(
            f"  resume    : resumable streams are logged in {config.store}, shared by every process",
            flush=True,
        )
    elif workers > 1:  # each worker's memory store is its own (lesson 11)
        print(
            "  resume    : each worker keeps its own resumable streams; --store redis://... shares them",
            flush=True,
        )
    if config.certfile:
        trust = f"; clients trust {config.ca}" if config.ca else ""
        print(f"  TLS       : HTTP/2 or HTTP/1.1, agreed by ALPN{trust}", flush=True)
    if config.api_keys:  # auth.py: `refimpl chat` sends REFIMPL_API_KEY itself
        n = len(config.api_keys)
        print(
            f"  API keys  : {n} key{'s' * (n > 1)} from REFIMPL_API_KEY required"
            f" (add -H 'Authorization: Bearer KEY' to curl); public: {' '.join(config.public_paths)}",
            flush=True,
        )
    if config.cors_origins:
        print(f"  CORS      : pages from {' '.join(config.cors_origins)} may call this server", flush=True)


async def run_chat(args: argparse.Namespace) -> int:
    from .client import StreamError, stream_chat

    simulate = {k: v for k in ("tokens", "itl_ms", "ttft_ms") if (v := getattr(args, k)) is not None}
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "stream_options": {"include_usage": True},
    }
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if simulate:
        body["simulate"] = simulate
    from .ws_client import CONNECT_ERRORS, connect

    first = last = None
    n, usage = 0, None

    def show(event) -> None:  # a client.StreamEvent or a ws_client.WSEvent
        nonlocal first, last, n, usage
        if event.content:
            first = first if first is not None else event.at
            last, n = event.at, n + 1
            print(event.content, end="", flush=True)
        usage = event.usage or usage

    try:
        if args.protocol == "ws":
            async with connect(args.url) as ws:
                start = trio.current_time()  # TTFT counts from the request, not the handshake
                async for event in ws.chat(
                    body["messages"], max_tokens=args.max_tokens, simulate=simulate or None
                ):
                    if event.type == "error":
                        raise StreamError(event.error)
                    show(event)
        elif args.protocol == "grpc":
            from .grpc_client import stream_chat as grpc_stream_chat

            start = trio.current_time()  # grpcio connects lazily: set-up counts, as for SSE
            async with grpc_stream_chat(args.url, body) as events:
                async for event in events:
                    show(event)
        else:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
                start = trio.current_time()  # TTFT counts from the request, not client set-up
                async for event in stream_chat(client, args.url, body):
                    show(event)
    except StreamError as err:
        if err.error.get("grpc_status") == "UNAVAILABLE" and not err.error.get("code"):
            print(f"\ncannot reach {args.url}: {err.error['message']}", file=sys.stderr)
        else:
            print(f"\nerror: {err.error}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, *CONNECT_ERRORS) as err:
        print(f"\ncannot reach {args.url}: {err or err.__cause__}", file=sys.stderr)
        return 1
    print()
    if first is None:
        print("(no content)")
        return 0
    # SSE sends one event per token; a WebSocket message or a gRPC chunk may
    # carry several (all that were ready), so count tokens from usage.
    tokens = (usage or {}).get("completion_tokens", n)
    gaps = (last - first) / (tokens - 1) * 1000 if tokens > 1 else 0.0
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("inf")
    print(
        f"TTFT {(first - start) * 1000:.1f} ms · {tokens} tokens in {n} messages · "
        f"mean ITL {gaps:.2f} ms · {rate:.0f} tokens/s · usage {usage}"
    )
    return 0


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """``--help`` of every command and subcommand shows each default."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


# Errors binding the listening socket, which a user fixes with another --host/--port.
_LISTEN_ERRORS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (possibly nested) group: trio and hypercorn nest nurseries."""
    err: BaseException = group
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refimpl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _chat_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    _show_defaults(parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.workers < 1 or args.backlog < 1:
            parser.error("--workers and --backlog must be at least 1")
        if (args.certfile is None) != (args.keyfile is None) or (args.tls and args.certfile):
            parser.error("TLS: either --tls, or both --certfile and --keyfile")
        if (args.tls or args.certfile) and args.workers > 1:
            parser.error("TLS with --workers is not supported yet: run one process")
        config = config_from_args(args)
        if args.tls:
            from .tls import local_certificate

            tls = local_certificate()
            config = replace(config, certfile=str(tls.certfile), keyfile=str(tls.keyfile), ca=str(tls.ca))
        try:
            if args.workers > 1:  # a parent: workers.py starts `refimpl <argv>` N times
                from .workers import serve_workers

                argv = sys.argv[1:] if argv is None else argv
                welcome = partial(_print_welcome, config, workers=args.workers)
                code = serve_workers(config, args.workers, argv, welcome)
            else:
                trio.run(run_server, config, args.quiet, args.listen_fd)
                code = 0
        except* OSError as group:  # the port is taken, most likely: say so, no traceback
            err = _first_leaf(group)
            if err.errno not in _LISTEN_ERRORS:
                raise
            where = f"{config.host}:{config.port}"
            if err.errno == errno.EADDRINUSE:
                sys.exit(
                    f"refimpl: {where} is already in use (is another `refimpl serve` or `make run`"
                    f" still running?). Stop it, or choose another port: --port {config.port + 1}"
                )
            sys.exit(f"refimpl: cannot listen on {where}: {err.strerror}")
        sys.exit(code)
    elif args.command == "chat":
        try:
            sys.exit(trio.run(run_chat, args))
        except KeyboardInterrupt:  # Ctrl-C: the stream is closed (the server cancels), no traceback
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
    else:
        sys.exit(trio.run(args.run, args))
