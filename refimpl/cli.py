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

import httpx
import trio

from .cli_args import chat_parser, config_from_args, serve_parser, show_defaults
from .config import Config


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
    serve_parser(sub)
    chat_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    show_defaults(parser)
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
