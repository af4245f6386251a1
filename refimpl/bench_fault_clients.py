"""The faulty clients of ``refimpl bench faults``: one coroutine per way a client misbehaves.

Strategy
--------
A server meets every kind of client at once: the polite ones that read a
stream to its end, and the ones that hang up in the middle, send garbage,
read one byte at a time or never finish their request.  Each kind here is
one coroutine that plays one such client *once*, on a connection of its own,
and returns an **outcome**, a short label (``complete``, ``left``, ``HTTP
400 invalid_json``, ``error timeout``, ``408``, ``open at end`` ...).
``bench_faults.py`` runs many of them against one server, counts the
outcomes per kind, and judges each against :data:`EXPECTED`: what the
server's documented behaviour (DESIGN §2-3, lesson 14) allows for that
kind.  Anything else is a violation, reported with its label.

The polite clients are the ones users run: our own SSE client
(``client.py``), the openai SDK, our WebSocket client (``ws_client.py``).
The rude ones need raw sockets, because no library will misbehave on
purpose: h11 frames HTTP/1.1 for them and wsproto the WebSocket (RFC 6455)
handshake, so only the fault itself is written by hand -- a FIN or an RST
(``SO_LINGER`` 0, RFC 9293 §3.5.2's abort) in the middle of a stream, a
receive buffer of a few KiB read in small sips, headers or a body that
trickle in a byte at a time (slowloris).
"""

from __future__ import annotations

import functools
import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import trio
import wsproto
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

from .client import StreamError, stream_chat
from .config import DEFAULT_MODEL
from .protocols.chat_request import FAIL_WITH
from .sse import SSEParser
from .ws_client import connect as ws_connect

#: Failures the mid-stream clients ask the simulated model for ("crash", a
#: bug on purpose, logs a traceback and is tested in test_midstream_errors).
FAIL_CODES = sorted(FAIL_WITH - {"crash"})
#: Statuses a bad request may get before any stream (DESIGN §2).
PRE_STREAM = {400, 404, 405, 408, 413, 415}


@dataclass(eq=False)  # hashed by identity (functools.cache below)
class Run:
    """What every client of one run shares: where, how long, and what it saw."""

    url: str
    deadline: float  # trio.current_time() when the run ends
    tokens: int = 50  # a normal stream's length ...
    itl_ms: float = 10.0  # ... and pace
    drip: float = 0.5  # seconds between two bytes of a slowloris
    http: httpx.AsyncClient | None = None
    sdk: Any = None  # an openai.AsyncOpenAI (the dev extra's), if installed
    ttft: list[float] = field(default_factory=list)  # normal streams' first token, seconds
    closed_after: dict[str, list[float]] = field(default_factory=dict)  # slowloris: seconds to 408/close

    @property
    def host(self) -> str:  # the Host header
        return urlsplit(self.url).netloc

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port

    def body(self, n: int, **extra: Any) -> dict[str, Any]:
        simulate = {"tokens": self.tokens, "itl_ms": self.itl_ms, "ttft_ms": 0} | extra
        message = {"role": "user", "content": f"fault load client {n}"}
        return {"model": DEFAULT_MODEL, "messages": [message], "simulate": simulate}


# -- the polite clients -------------------------------------------------------------------
async def sse(run: Run, n: int) -> str:
    """Our SSE client (``client.py``): [DONE], a finish_reason, the usage."""
    sent, finish, usage, first, gen_id = trio.current_time(), None, None, None, None
    body = run.body(n) | {"stream_options": {"include_usage": True}}
    try:
        async for event in stream_chat(run.http, run.url, body):
            if event.content and first is None:
                first = event.at
            finish, usage, gen_id = event.finish_reason or finish, event.usage or usage, event.id
    except StreamError as err:
        return f"error {err.error.get('code')} (generation {gen_id})"
    except httpx.TransportError as err:  # the bench looks up the generation's trace
        return f"cut: {type(err).__name__}: {err} (generation {gen_id})"
    return _complete(run, first and first - sent, finish, usage)


async def sdk(run: Run, n: int) -> str:
    """The openai SDK, as applications call it."""
    import openai  # the dev extra's: only this kind needs it

    sent, finish, usage, first = trio.current_time(), None, None, None
    body = run.body(n)
    try:
        chunks = await run.sdk.chat.completions.create(
            model=body["model"],
            messages=body["messages"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"simulate": body["simulate"]},
        )
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or trio.current_time()
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            usage = chunk.usage or usage
    except openai.APIStatusError as err:
        return f"HTTP {err.status_code}"
    except openai.APIError as err:  # an error event mid-stream, or a cut connection
        return f"error {err.code}" if err.code else f"{type(err).__name__}: {err.message[:100]}"
    return _complete(run, first and first - sent, finish, usage and usage.model_dump())


async def ws(run: Run, n: int, cancel: bool = False) -> str:
    """Our WebSocket client, one turn; with ``cancel``, a cancel after the first token."""
    sent, first = trio.current_time(), None
    async with ws_connect(run.url) as chat:
        body = run.body(n, tokens=run.tokens * (10 if cancel else 1))
        async for event in chat.chat(body["messages"], simulate=body["simulate"]):
            if event.type == "token" and first is None:
                first = event.at
                if cancel:
                    await chat.cancel()
            if event.type == "error":
                return f"error {event.error['code']}"
            if event.type in ("done", "cancelled"):
                if cancel:
                    return event.type
                return _complete(run, first and first - sent, event.finish_reason, event.usage)
    return "no final message"


def _complete(run: Run, ttft: float | None, finish: str | None, usage: dict | None) -> str:
    if ttft is None or finish is None or not usage or usage.get("completion_tokens") != run.tokens:
        return f"incomplete (finish_reason {finish}, usage {usage})"
    run.ttft.append(ttft)
    return "complete"


async def ws_cancel(run: Run, n: int) -> str:
    return await ws(run, n, cancel=True)


async def midstream(run: Run, n: int) -> str:
    """A model that fails after a few tokens (``simulate.fail_with``): SSE and WebSocket in turn."""
    code = FAIL_CODES[n % len(FAIL_CODES)]
    body = run.body(n, fail_after_tokens=n % 4, fail_with=code)
    if n % 2:
        async with ws_connect(run.url) as chat:
            async for event in chat.chat(body["messages"], simulate=body["simulate"]):
                if event.type != "token":
                    got = event.error["code"] if event.type == "error" else event.type
                    return "error as asked" if got == code else f"error {got} (asked {code})"
    try:
        async for _ in stream_chat(run.http, run.url, body):
            pass
    except StreamError as err:
        got = err.error.get("code")
        return "error as asked" if got == code else f"error {got} (asked {code})"
    return "ended without the error"


# region: bad-bodies
@functools.cache  # a 2 MiB json.dumps would stall every client in this process each time
def _bad_bodies(run: Run) -> list[tuple[str, dict[str, Any]]]:
    good = run.body(0) | {"stream": True}
    huge = json.dumps(good | {"pad": "x" * (2 << 20)}).encode()  # over the 1 MiB default
    return [
        ("not JSON", {"content": b'{"model": "refimpl-sim", "messages": [', "headers": _JSON}),
        ("not an object", {"json": [good]}),
        ("messages a string", {"json": good | {"messages": "hello"}}),
        ("stream a string", {"json": good | {"stream": "yes"}}),
        ("negative tokens", {"json": good | {"simulate": {"tokens": -5}}}),
        ("huge", {"content": huge, "headers": _JSON}),
        ("text/plain", {"content": json.dumps(good).encode(), "headers": {"content-type": "text/plain"}}),
        ("unknown model", {"json": good | {"model": "gpt-9"}}),
    ]


_JSON = {"content-type": "application/json"}


async def bad_body(run: Run, n: int) -> str:
    """A request the server must refuse, politely: a documented status, the OpenAI shape."""
    _, request = _bad_bodies(run)[n % 8]
    # A connection of its own: after a refused big body, the connection is
    # stuck (see reuse_after_refusal), and must not be handed to another client.
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(10)) as http:
        try:
            resp = await http.post(run.url + "/v1/chat/completions", **request)
        except httpx.TransportError as err:  # a huge body refused before it was all sent
            return f"closed while sending ({type(err).__name__})"
    return _refusal(resp.status_code, resp.content)


_BIG = b"x" * 900_000  # more than hypercorn's queue of body chunks holds: read by nobody


async def reuse_after_refusal(run: Run, n: int) -> str:
    """A big body refused unread (415), then a second request on the same
    keep-alive connection: it must be answered, or the connection closed."""
    big = {"content": _BIG, "headers": {"content-type": "text/plain"}}
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(5)) as http:
        first = _refusal(*_answer(await http.post(run.url + "/v1/chat/completions", **big)))
        try:
            second = (await http.get(run.url + "/v1/models")).status_code
        except httpx.TimeoutException as err:
            return f"{first}, then the connection hung ({type(err).__name__})"
    return f"{first}, then HTTP {second}"


def _answer(resp: httpx.Response) -> tuple[int, bytes]:
    return resp.status_code, resp.content


def _refusal(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        shaped = all(isinstance(error[k], str) for k in ("message", "type")) and "code" in error
    except (ValueError, KeyError, TypeError):
        shaped, error = False, {}
    return f"HTTP {status} {error.get('code')}" if shaped else f"HTTP {status} (not the OpenAI shape)"


# endregion: bad-bodies


# -- the rude clients, on raw sockets ----------------------------------------------------------
async def _open(run: Run, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect(): the window the client advertises follows it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(run.address)
    return trio.SocketStream(sock)


async def _close(stream: trio.SocketStream, rst: bool) -> None:
    if rst:  # SO_LINGER on, 0 s: close() sends an RST and drops what is unsent
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


# region: raw-sse
async def _raw_stream(stream: trio.SocketStream, run: Run, body: dict, sip: int = 65536, pause: float = 0):
    """POST ``body`` with h11, then yield ("status", code) and each SSE event;
    ``sip`` bytes a read, ``pause`` seconds between reads (a slow reader)."""
    conn, parser = h11.Connection(h11.CLIENT), SSEParser()
    data = json.dumps(body | {"stream": True, "stream_options": {"include_usage": True}}).encode()
    head = [("host", run.host), ("content-type", "application/json")]
    head.append(("content-length", str(len(data))))
    await stream.send_all(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=head)))
    await stream.send_all(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            await trio.sleep(pause)
            conn.receive_data(await stream.receive_some(sip))
        elif isinstance(event, h11.Response):
            yield "status", event.status_code
        elif isinstance(event, h11.Data):
            for sse_event in parser.feed(bytes(event.data)):
                yield "event", sse_event


# endregion: raw-sse


def _content(data: str) -> str:
    chunk = json.loads(data) if data != "[DONE]" else {}
    return "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))


async def hang_up(run: Run, n: int, rst: bool = False) -> str:
    """A stream left after its first token: FIN (close) or RST (abort)."""
    stream = await _open(run)
    try:
        async for kind, value in _raw_stream(stream, run, run.body(n, tokens=run.tokens * 10)):
            if kind == "status" and value != 200:
                return f"HTTP {value}"
            if kind == "event" and _content(value.data):
                return "left"
        return "ended before a token"
    finally:
        await _close(stream, rst)


async def hang_up_rst(run: Run, n: int) -> str:
    return await hang_up(run, n, rst=True)


async def slow_reader(run: Run, n: int) -> str:
    """A 4 KiB receive buffer read 1 KiB at a time, 10 ms apart: slow, but it reads everything."""
    stream, done, finish, usage = await _open(run, rcvbuf=4096), False, None, None
    try:
        async for kind, value in _raw_stream(stream, run, run.body(n), sip=1024, pause=0.01):
            if kind == "status" and value != 200:
                return f"HTTP {value}"
            if kind == "event" and value.data == "[DONE]":
                done = True
            elif kind == "event":
                chunk = json.loads(value.data)
                usage = chunk.get("usage") or usage
                finish = next(
                    (c["finish_reason"] for c in chunk.get("choices", []) if c["finish_reason"]), finish
                )
    finally:
        await stream.aclose()
    if not done or finish is None or (usage or {}).get("completion_tokens") != run.tokens:
        return f"incomplete (done {done}, finish_reason {finish}, usage {usage})"
    return "complete"


async def ws_abort(run: Run, n: int) -> str:
    """A WebSocket closed without a close frame after its first token: FIN or RST in turn."""
    stream, ws = await _open(run), wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    try:
        await stream.send_all(ws.send(Request(host=run.host, target="/v1/ws/chat")))
        body = run.body(n, tokens=run.tokens * 10)
        while True:
            ws.receive_data(await stream.receive_some(65536) or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    chat = {"type": "chat", "messages": body["messages"], "simulate": body["simulate"]}
                    await stream.send_all(ws.send(wsproto.events.Message(data=json.dumps(chat))))
                elif isinstance(event, TextMessage) and json.loads(event.data)["type"] == "token":
                    return "left"
                elif isinstance(event, CloseConnection | RejectConnection | TextMessage):
                    return f"ended ({type(event).__name__}: {getattr(event, 'data', '')[:80]})"
    finally:
        await _close(stream, rst=bool(n % 2))


# region: slowloris
async def _drip(run: Run, kind: str, start: bytes, byte: bytes) -> str:
    """Send ``start``, then ``byte`` every ``run.drip`` s: a request that never
    completes.  What did the server do, and when?  (RFC 9110 §15.5.9: 408.)"""
    stream, began = await _open(run), trio.current_time()
    try:
        await stream.send_all(start)
        while trio.current_time() < run.deadline:
            with trio.move_on_after(run.drip):
                data = await stream.receive_some(65536)
                run.closed_after.setdefault(kind, []).append(trio.current_time() - began)
                return "closed" if not data else data.split(b"\r\n", 1)[0].decode()[9:12]
            await stream.send_all(byte)
    except (trio.BrokenResourceError, OSError):
        run.closed_after.setdefault(kind, []).append(trio.current_time() - began)
        return "closed"
    finally:
        await stream.aclose()
    return "open at end"


async def slowloris(run: Run, n: int) -> str:
    """Headers that never end."""
    return await _drip(run, "slowloris", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a")


async def slow_body(run: Run, n: int) -> str:
    """A body that stops half-way (the issue's file-descriptor leak)."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return await _drip(run, "slow_body", head + b'Content-Length: 4096\r\n\r\n{"model": ', b" ")


# endregion: slowloris

#: kind -> (the client, the outcomes the server's documented behaviour allows).
KINDS: dict[str, tuple[Any, frozenset[str]]] = {
    "sse": (sse, frozenset({"complete"})),
    "openai": (sdk, frozenset({"complete"})),
    "ws": (ws, frozenset({"complete"})),
    "fin": (hang_up, frozenset({"left"})),
    "rst": (hang_up_rst, frozenset({"left"})),
    "midstream": (midstream, frozenset({"error as asked"})),
    "bad_body": (bad_body, frozenset()),  # judged by _refusal's label: see expected()
    "reuse_after_refusal": (
        reuse_after_refusal,
        frozenset({"HTTP 415 unsupported_media_type, then HTTP 200"}),
    ),
    "ws_cancel": (ws_cancel, frozenset({"cancelled", "done"})),
    "ws_abort": (ws_abort, frozenset({"left"})),
    "slow_reader": (slow_reader, frozenset({"complete"})),
    "slowloris": (slowloris, frozenset({"408", "closed"})),
    "slow_body": (slow_body, frozenset({"408", "closed"})),
}
NORMAL = ("sse", "openai", "ws")  # their first-token latency is the "during" sample
ONCE = ("slowloris", "slow_body")  # one connection each for the whole run


def expected(kind: str, outcome: str) -> bool:
    if kind == "bad_body":  # a documented 4xx in the OpenAI shape (or refused mid-upload)
        status = outcome.split()[1] if outcome.startswith("HTTP ") else ""
        documented = status.isdigit() and int(status) in PRE_STREAM
        return (documented and "not the OpenAI shape" not in outcome) or outcome.startswith("closed while")
    return outcome in KINDS[kind][1]
