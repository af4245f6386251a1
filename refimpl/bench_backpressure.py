"""``refimpl bench backpressure``: the server's memory while a client stops reading.

Strategy
--------
TCP flow control (RFC 9293 §3.8.6) is how a server learns of a stalled reader:
each segment from the receiver carries a window, the bytes it still has room
for, and the sender may not have more than that in flight.  A client that stops
reading fills its receive buffer and advertises a zero window, our kernel's send
buffer fills behind it, and the server's next write blocks.  From then on only
the server's own memory can grow, by what its policy lets the model make
meanwhile (``patterns/backpressure.py``, lesson 10).  The issue's proof: a
client with a 4 KiB receive buffer stops reading a 200,000-token stream at
``itl_ms 0``; over 10 s the server's RSS grows less than 1 MiB under ``pause``
and ``disconnect``, 1 MiB + the coalesce cap under ``coalesce``; and the trace
says ``paused``.

Each (policy, protocol) case has a server process of its own (``refimpl serve
--port 0`` prints the URL it bound), so one RSS is one case; all run at once.
A warm-up stream is read to its end first, so one-time allocations are not
growth.  Then a raw socket with ``SO_RCVBUF`` set before connect (the window
scale is fixed by the handshake) reads up to the first content token and
stops.  VmRSS right then is the baseline; a sample every 0.25 s for 10 s is
the measurement (not a synchronisation).  ``tokens_made`` is read mid-stall
from ``/metrics`` (the WebSocket's generation id is not known yet, see below):
``refimpl_tokens_total`` minus its count before the request.
A ``paused`` under pause/disconnect is stamped when the blocked write began but
known only once it returns, so the stall is ended before the trace is read:
the SSE client reads on past ``tokens_made`` tokens; the WebSocket client,
whose generation id comes only with a turn's last message, sends ``cancel``
and reads up to that message.  Then the server gets SIGINT (it drains).

The limit for ``coalesce`` adds a full buffer: per pending token a list slot
(8 bytes) and a ``str`` of its own, by ``sys.getsizeof`` over a cap's worth of
the simulated model's tokens.  That model reuses its string objects, so this
overstates its buffer; a real detokenizer makes a new string per token.  The
guards that drop a client who reads nothing are off (``--stall-timeout 0``,
``--ws-ping-interval 0``): the defaults (one write stalled 30 s, pings missed
for 20 + 20 s) spare a 10 s window but would cut a longer ``--seconds`` short.
Such a client never lets a write return, so ``disconnect`` cannot rate it: it
acts as ``pause`` until the stall ends.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import h11
import httpx
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from .backend import ModelRequest, count_tokens
from .bench import environment
from .benchload import memory_kib
from .config import DEFAULT_MODEL
from .model import simulated_text, simulated_token
from .patterns.backpressure import POLICIES
from .sse import SSEParser

HOST = "127.0.0.1"
PROTOCOLS = ("sse", "ws")
PROMPT = "Why does a client that stops reading not fill the server's memory?"
WARMUP_TOKENS = 200
BASE_LIMIT_KIB = 1024
STEP_DEADLINE = 60.0  # seconds one step (starting a server, a warm-up, a read) may take


@dataclass
class Case:
    """One policy over one protocol.  RSS in KiB; sample times in s since the client stopped."""

    policy: str
    protocol: str
    limit_kib: int
    idle_kib: int = 0  # after the warm-up, before the stalled request
    baseline_kib: int = 0  # when the client stopped reading
    samples: list[tuple[float, int]] = field(default_factory=list)
    tokens_made: int = 0  # by the model, at the end of the window
    tokens_received: int = 0  # content tokens the client had when it stopped
    trace: list[dict[str, Any]] = field(default_factory=list)  # its events, once the stall ended

    @property
    def growth_kib(self) -> int:
        return max(kib for _, kib in self.samples) - self.baseline_kib

    @property
    def trace_events(self) -> list[str]:
        return [e["name"] for e in self.trace]

    @property
    def ok(self) -> bool:
        return self.growth_kib < self.limit_kib and "paused" in self.trace_events


def coalesce_cap_kib(cap: int) -> int:
    """What a full coalesce buffer can hold (the module docstring says how)."""
    text = simulated_text(ModelRequest(messages=(("user", PROMPT),)).prompt, 0)  # seed 0, the default
    pending = [simulated_token(text, i) for i in range(cap)]
    return math.ceil((sys.getsizeof(pending) + sum(map(sys.getsizeof, pending))) / 1024)


def rss_kib(pid: int) -> int:
    """Resident memory now (VmRSS, KiB): ``benchload.memory_kib``'s first half."""
    return memory_kib(pid)[0]


@asynccontextmanager
async def running_server(cap: int) -> AsyncIterator[tuple[int, str]]:
    """``refimpl serve --port 0`` in its own process: yields (pid, URL); SIGINT on the way out."""
    cmd = [sys.executable, "-m", "refimpl", "serve", "--host", HOST, "--port", "0", "--drain-timeout", "2"]
    cmd += ["--coalesce-max-tokens", str(cap), "--stall-timeout", "0", "--ws-ping-interval", "0"]
    with tempfile.TemporaryFile() as log:  # stdout: the banner, then nothing, so the pipe never fills
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log)
        try:
            banner = b""
            with trio.fail_after(STEP_DEADLINE):
                while b"\n" not in banner and (chunk := await proc.stdout.receive_some()):
                    banner += chunk
            if (bound := re.search(rb"streaming on (http://\S+)", banner)) is None:
                log.seek(0)
                raise RuntimeError(f"refimpl serve did not start:\n{log.read().decode()[-2000:]}")
            yield proc.pid, bound[1].decode()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)  # it drains, then stops
                with trio.move_on_after(STEP_DEADLINE):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await proc.stdout.aclose()


# -- two raw clients of one shape --------------------------------------------------
class Peer:
    """One streamed chat turn on a raw socket (``self.stream``, the caller's to
    close), read only when told to.  A subclass speaks its protocol: ``_start``
    sends the turn, ``_feed`` takes bytes (True: the turn is over), and
    ``end_stall`` makes the blocked write return."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = 0  # content tokens
        self.id: str | None = None  # the generation's, once known
        self.ended = False  # the turn (or the connection) is over

    @classmethod
    async def open(cls, url: str, policy: str, tokens: int, rcvbuf: int | None = None) -> Self:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        simulate = {"ttft_ms": 0, "itl_ms": 0, "tokens": tokens}  # a model that never waits
        turn = {"messages": [{"role": "user", "content": PROMPT}], "simulate": simulate}
        sock = trio.socket.socket()
        try:
            if rcvbuf:  # before connect: the window scale is fixed by the handshake
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect((host, int(port)))
            peer = cls(trio.SocketStream(sock))
            await peer._start({**turn, "backpressure": policy})
        except BaseException:
            sock.close()
            raise
        return peer

    async def read_until(self, enough: Callable[[], bool] = lambda: False) -> None:
        """Read until ``enough()``, or until the turn is over."""
        with trio.fail_after(STEP_DEADLINE):
            while not (self.ended or enough()):
                data = await self.stream.receive_some(4096)
                self.ended = not data or self._feed(data)


class SSEPeer(Peer):
    """``POST /v1/chat/completions`` with h11; the id is the ``X-Request-Id`` header."""

    async def _start(self, turn: dict[str, Any]) -> None:
        self.http, self.events = h11.Connection(h11.CLIENT), SSEParser()
        body = json.dumps({"model": DEFAULT_MODEL, "stream": True, **turn}).encode()
        headers = [("Host", HOST), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        send = self.http.send
        head = send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers))
        await self.stream.send_all(head + send(h11.Data(data=body)) + send(h11.EndOfMessage()))

    def _feed(self, data: bytes) -> bool:
        self.http.receive_data(data)
        while (event := self.http.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise RuntimeError(f"POST /v1/chat/completions: HTTP {event.status_code}")
                self.id = dict(event.headers)[b"x-request-id"].decode()
            elif isinstance(event, h11.Data):
                for sse in self.events.feed(event.data):  # (an "error" event has no tokens)
                    if sse.type == "message" and sse.data != "[DONE]":
                        for choice in json.loads(sse.data)["choices"]:
                            self.received += count_tokens(choice["delta"].get("content") or "")
            else:  # the end of the body, or of the connection
                return True
        return False

    async def end_stall(self, made: int) -> None:
        """Read on past the ``made`` tokens: the blocked write has returned."""
        await self.read_until(lambda: self.received > made)


class WSPeer(Peer):
    """``/v1/ws/chat`` with wsproto; the id comes with the turn's last message."""

    async def _start(self, turn: dict[str, Any]) -> None:
        self.ws, self.text, self.accepted = WSConnection(ConnectionType.CLIENT), "", False
        await self.stream.send_all(self.ws.send(Request(host=HOST, target="/v1/ws/chat")))
        await self.read_until(lambda: self.accepted)
        if not self.accepted:
            raise RuntimeError("the WebSocket handshake failed")
        await self.send({"type": "chat", **turn})

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(message))))

    def _feed(self, data: bytes) -> bool:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif not isinstance(event, TextMessage):  # a close (or a rejection)
                return True
            elif not event.message_finished:
                self.text += event.data
            else:
                message, self.text = json.loads(self.text + event.data), ""
                if message["type"] != "token":  # done, cancelled or error: the turn is over
                    self.id = message.get("id")
                    return True
                self.received += count_tokens(message["content"])
        return False

    async def end_stall(self, made: int) -> None:
        """Cancel, and read up to the turn's last message (past ``made`` tokens, too)."""
        await self.send({"type": "cancel"})
        await self.read_until()


PEERS: dict[str, type[SSEPeer | WSPeer]] = {"sse": SSEPeer, "ws": WSPeer}


# -- the measurement ----------------------------------------------------------------
async def tokens_counter(debug: httpx.AsyncClient) -> int:
    """``refimpl_tokens_total`` from ``/metrics``: every token this server's model made."""
    metrics = (await debug.get("/metrics")).raise_for_status().text
    return int(float(re.search(r"^refimpl_tokens_total (\S+)$", metrics, re.MULTILINE)[1]))


async def measure_case(case: Case, seconds: float, tokens: int, rcvbuf: int, cap: int, every: float) -> None:
    peer_type = PEERS[case.protocol]
    async with running_server(cap) as (pid, url), httpx.AsyncClient(base_url=url, trust_env=False) as debug:
        warm = await peer_type.open(url, case.policy, WARMUP_TOKENS)
        async with warm.stream:
            await warm.read_until()
        made_before, case.idle_kib = await tokens_counter(debug), rss_kib(pid)
        peer = await peer_type.open(url, case.policy, tokens, rcvbuf)
        async with peer.stream:
            await peer.read_until(lambda: peer.received > 0)
            if peer.ended:
                raise RuntimeError(f"{case.policy}/{case.protocol}: the stream ended before the stall")
            stopped = trio.current_time()
            case.baseline_kib, case.tokens_received = rss_kib(pid), peer.received
            for i in range(1, max(1, round(seconds / every)) + 1):
                await trio.sleep_until(stopped + i * every)
                case.samples.append((round(trio.current_time() - stopped, 3), rss_kib(pid)))
            case.tokens_made = await tokens_counter(debug) - made_before
            await peer.end_stall(case.tokens_made)
            if peer.id is None:
                raise RuntimeError(f"{case.policy}/{case.protocol}: no generation id")
            trace = await debug.get(f"/v1/debug/generations/{peer.id}")
            case.trace = trace.raise_for_status().json()["events"]


async def measure(
    policies: tuple[str, ...] | list[str] = POLICIES,
    protocols: tuple[str, ...] | list[str] = PROTOCOLS,
    *,
    seconds: float = 10.0,
    tokens: int = 200_000,
    rcvbuf: int = 4096,
    coalesce_max_tokens: int = 4096,
    sample_every: float = 0.25,
) -> list[Case]:
    """Every (policy, protocol) case at once, each on its own server; in the order asked."""
    cap_kib = coalesce_cap_kib(coalesce_max_tokens)
    cases = [
        Case(policy, protocol, BASE_LIMIT_KIB + (cap_kib if policy == "coalesce" else 0))
        for policy in policies
        for protocol in protocols
    ]
    async with trio.open_nursery() as nursery:
        for case in cases:
            knobs = (seconds, tokens, rcvbuf, coalesce_max_tokens, sample_every)
            nursery.start_soon(measure_case, case, *knobs)
    return cases


# -- the command ----------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backpressure",
        aliases=["stalled"],  # what the client does, as the issue names its scenarios
        help="server RSS while a client stops reading (lesson 10)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="how long the client reads nothing")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens the stalled stream asks for")
    p.add_argument("--rcvbuf", type=int, default=4096, help="the client's SO_RCVBUF, bytes")
    p.add_argument("--coalesce-max-tokens", type=int, default=4096, help="the servers' coalesce cap")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--json", type=Path, default=None, help="also save the results to this file")
    p.set_defaults(run=run)


def command_line(args: argparse.Namespace) -> str:
    return (
        f"refimpl bench backpressure --seconds {args.seconds:g} --tokens {args.tokens} --rcvbuf {args.rcvbuf}"
        f" --coalesce-max-tokens {args.coalesce_max_tokens} --policies {' '.join(args.policies)}"
        f" --protocols {' '.join(args.protocols)}"
    )


def table(cases: list[Case]) -> str:
    def events(names: list[str]) -> str:  # in order of first appearance, repeats counted
        return " ".join(n if k == 1 else f"{n}x{k}" for n, k in Counter(names).items())

    line = "{:12}{:10}{:>10}{:>10}{:>8}{:>8}{:>8}{:>10}{:>5}   {}".format
    head = ("policy", "protocol", "idle", "at stop", "growth", "limit", "made", "received", "ok", "trace")
    rows = [line(*head)]
    for c in cases:
        kib = (c.idle_kib, c.baseline_kib, c.growth_kib, c.limit_kib, c.tokens_made, c.tokens_received)
        ok = "yes" if c.ok else "NO"
        rows.append(line(c.policy, c.protocol, *(f"{n:,}" for n in kib), ok, events(c.trace_events)))
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> int:
    if min(args.seconds, args.tokens, args.rcvbuf, args.coalesce_max_tokens) <= 0:
        raise SystemExit("need --seconds, --tokens, --rcvbuf and --coalesce-max-tokens > 0")
    print(f"{len(args.policies) * len(args.protocols)} cases at once, {args.seconds:g} s", file=sys.stderr)
    knobs = {"seconds": args.seconds, "tokens": args.tokens, "rcvbuf": args.rcvbuf}
    knobs["coalesce_max_tokens"] = args.coalesce_max_tokens
    cases = await measure(args.policies, args.protocols, **knobs)
    print(f"\n$ {command_line(args)}")
    print(
        f"server RSS (KiB) while a client with a {args.rcvbuf} B SO_RCVBUF reads nothing for {args.seconds:g} s"
    )
    print(
        "(idle: after the warm-up; at stop: when it stopped; growth: the most since; made/received: tokens)"
    )
    print(table(cases))
    if args.json is not None:
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command_line(args),
            "config": {**knobs, "itl_ms": 0, "warmup_tokens": WARMUP_TOKENS},
            "machine": environment(),
            "cases": [{**vars(c), "growth_kib": c.growth_kib, "ok": c.ok} for c in cases],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0 if all(c.ok for c in cases) else 1
