"""Hypothesis against the running server: bodies, headers, WebSocket messages (lesson 14).

The request validators have their own unit tests; these ask the *server*,
over real sockets, whether anything a client can send gets a documented
answer.  For every generated request: a status of DESIGN §2 (never a 5xx)
in the route's error shape, or a stream that ends the documented way; no
traceback in the server's log; no generation left running (the engine is
idle again after each example); no hung connection (every call under
``trio.fail_after``).

One server per test function, not per example: the test starts it, then
runs Hypothesis in a worker thread (``trio.to_thread``), and each example
does its I/O back in the test's trio loop (``trio.from_thread.run``).
The bodies are shaped around the real schemas (a valid request mutated:
odd roles and contents, wrong types, huge and negative numbers, lone
surrogates, unknown keys, ``simulate`` knobs, stream/stream_options
combinations), so most examples get past the JSON decoder.  A few thousand
cases in ``make test``; more with ``REFIMPL_FUZZ_EXAMPLES=50000`` (examples
per test function).  Each bug found is pinned with ``@example``.

To add a route: an entry in :data:`ROUTES` (its path, a strategy for its
bodies, its error shape, the last events of a stream that ended well).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from conftest import TEST_SIMULATE
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from refimpl.bench_fault_clients import FAIL_CODES
from refimpl.config import Config
from refimpl.patterns.errors import FAILURES
from refimpl.sse import SSEParser

EXAMPLES = int(os.environ.get("REFIMPL_FUZZ_EXAMPLES", 600))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the server shares the machine: time is not the property
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONFIG = Config(simulate=TEST_SIMULATE, max_body_bytes=64 << 10)  # "huge" reaches 413 sooner
DOCUMENTED = {400, 401, 404, 405, 408, 413, 415, 429}  # DESIGN §2: errors before a stream
GUARD = 10  # seconds any one exchange may take: past it, the connection hung
MODEL = "refimpl-sim"

# -- JSON values shaped around the schemas ------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
TEXT = st.one_of(
    st.text(max_size=20), SURROGATES, st.text(st.characters(categories=["Cs", "So"]), max_size=4)
)
ODD_NUMBER = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=10**9 + 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
ODD = st.one_of(ODD_NUMBER, TEXT, ANY_JSON)


def maybe(good: st.SearchStrategy, odd: st.SearchStrategy = ODD) -> st.SearchStrategy:
    """A field: usually a good value, often an odd one."""
    return st.one_of(good, good, odd)


def body_of(
    required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy]
) -> st.SearchStrategy:
    """A JSON object: the required fields (each sometimes missing), some optional ones, unknown keys."""
    keep = {k: st.one_of(v, v, v, st.just(...)) for k, v in required.items()}
    return st.fixed_dictionaries(keep, optional=optional).map(
        lambda d: {k: v for k, v in d.items() if v is not ...}
    ) | st.builds(
        lambda d, extra: {**d, **extra},
        st.fixed_dictionaries(required),
        st.dictionaries(TEXT, ANY_JSON, max_size=2),
    )


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
CONTENT = st.one_of(
    TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2), ODD
)
MESSAGE = st.fixed_dictionaries({"role": maybe(ROLES), "content": CONTENT})
MESSAGES = maybe(st.lists(MESSAGE, min_size=1, max_size=3), st.one_of(st.just([]), ODD))
SIMULATE = maybe(
    st.fixed_dictionaries(
        {},
        optional={
            "ttft_ms": maybe(st.integers(0, 3), ODD_NUMBER),
            "itl_ms": maybe(st.floats(0, 2), ODD_NUMBER),
            "tokens": maybe(st.integers(0, 40), ODD_NUMBER),
            "fail_after_tokens": maybe(st.integers(0, 5), ODD_NUMBER),
            "fail_with": maybe(st.sampled_from(FAIL_CODES), TEXT.filter(lambda s: s != "crash")),
            "seed": maybe(st.integers(0, 2**31)),
            "warp": ANY_JSON,  # an unknown knob
        },
    )
)
STREAM = st.sampled_from([True, True, False, None, "yes", 1, 0])
STREAM_OPTIONS = st.one_of(st.none(), st.fixed_dictionaries({"include_usage": maybe(st.booleans())}), ODD)
MAX_TOKENS = st.one_of(st.integers(1, 50), st.integers(-(2**70), 2**70), ODD)

CHAT = body_of(
    {"model": maybe(st.just(MODEL), TEXT), "messages": MESSAGES},
    {
        "stream": STREAM,
        "stream_options": STREAM_OPTIONS,
        "max_tokens": MAX_TOKENS,
        "max_completion_tokens": MAX_TOKENS,
        "temperature": maybe(st.floats(0, 2)),
        "n": maybe(st.just(1)),
        "stop": maybe(st.lists(TEXT, max_size=5) | TEXT),
        "seed": maybe(st.integers()),
        "simulate": SIMULATE,
        "backpressure": maybe(st.sampled_from(["pause", "coalesce", "disconnect"])),
    },
)
ANTHROPIC = body_of(
    {"model": maybe(st.just(MODEL), TEXT), "messages": MESSAGES, "max_tokens": MAX_TOKENS},
    {
        "stream": STREAM,
        "system": maybe(TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}))),
        "stop_sequences": maybe(st.lists(TEXT, max_size=3)),
        "temperature": maybe(st.floats(0, 1)),
        "simulate": SIMULATE,
    },
)
RESPONSES = body_of(
    {"model": maybe(st.just(MODEL), TEXT), "input": maybe(TEXT | st.lists(MESSAGE, min_size=1, max_size=2))},
    {
        "stream": STREAM,
        "instructions": maybe(TEXT),
        "max_output_tokens": MAX_TOKENS,
        "previous_response_id": maybe(st.none(), TEXT),
        "store": maybe(st.booleans()),
        "simulate": SIMULATE,
    },
)


# -- what a good answer looks like, per route ---------------------------------------------------
def openai_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
    )


def anthropic_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return body.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("message"), str)


def chat_ended(events: list) -> bool:
    last = events[-1] if events else None
    return last is not None and (last.data == "[DONE]" or _failure_code(last) in FAILURES)


def typed_ended(finals: set[str]) -> Callable[[list], bool]:
    def ended(events: list) -> bool:
        return bool(events) and json.loads(events[-1].data).get("type") in finals

    return ended


def _failure_code(event: Any) -> str | None:
    if event.type != "error":
        return None
    error = json.loads(event.data).get("error") or {}
    return error.get("code") or error.get("type")


@dataclass(frozen=True)
class Route:
    path: str
    bodies: st.SearchStrategy
    error_shape: Callable[[Any], bool]
    stream_ended: Callable[[list], bool]


ROUTES = {
    "chat": Route("/v1/chat/completions", CHAT, openai_error, chat_ended),
    "messages": Route("/v1/messages", ANTHROPIC, anthropic_error, typed_ended({"message_stop", "error"})),
    "responses": Route(
        "/v1/responses",
        RESPONSES,
        openai_error,
        typed_ended({"response.completed", "response.failed", "response.incomplete"}),
    ),
}


# -- the harness ----------------------------------------------------------------------------------
@pytest.fixture
def tracebacks(caplog):
    caplog.set_level(logging.INFO, logger="refimpl")
    return lambda: [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def idle(server, tracebacks: Callable[[], list[str]]) -> None:
    """No generation left running after an example: the engine is idle again."""
    with trio.fail_after(GUARD):
        await server.engine.wait_idle()
    assert not tracebacks(), tracebacks()[0]  # per example: Hypothesis can shrink it


async def post(http: httpx.AsyncClient, server, route: Route, content: bytes, tracebacks) -> None:
    """One request; its answer judged (status, shape, how the stream ended); the engine idle after."""
    with trio.fail_after(GUARD):
        headers = {"content-type": "application/json"}
        async with http.stream("POST", server.url + route.path, content=content, headers=headers) as resp:
            raw = await resp.aread()
    status, kind = resp.status_code, resp.headers.get("content-type", "")
    assert status == 200 or status in DOCUMENTED, (status, raw[:300])
    if status != 200:
        assert route.error_shape(json.loads(raw)), raw[:300]
    elif kind.startswith("text/event-stream"):
        parser = SSEParser()
        events = [e for e in parser.feed(raw) + parser.close() if e.data]
        assert route.stream_ended(events), raw[-300:]
    else:
        json.loads(raw)  # a whole answer, as JSON
    await idle(server, tracebacks)


async def fuzz(check: Callable[..., Any], given_test: Callable[..., None]) -> None:
    """Run ``given_test`` (Hypothesis, in a worker thread); each example calls
    ``check(...)`` back in this trio loop."""
    token = trio.lowlevel.current_trio_token()
    await trio.to_thread.run_sync(given_test, token)


def in_loop(token: trio.lowlevel.TrioToken, check: Callable[..., Any], *args: Any) -> None:
    trio.from_thread.run(check, *args, trio_token=token)


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates go as \\udXXX escapes; NaN as NaN


# -- bodies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROUTES))
async def test_any_body_gets_a_documented_answer(start_server, tracebacks, name):
    server, route = await start_server(CONFIG), ROUTES[name]
    async with httpx.AsyncClient(trust_env=False, timeout=GUARD) as http:

        async def check(body: Any) -> None:
            await post(http, server, route, dumps(body), tracebacks)

        @FUZZ
        @given(body=route.bodies)
        @example(body={"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}], "stream": True})
        @example(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**70})
        def run(token, body):
            in_loop(token, check, body)

        await fuzz(check, run)
    assert tracebacks() == []


# -- headers ---------------------------------------------------------------------------------------
HEADER_BYTES = st.binary(max_size=30) | st.sampled_from(
    [b"application/json", b"application/json; charset=utf-8"]
)


async def raw_exchange(server, request: bytes, eof: bool) -> bytes:
    """Send ``request`` on a raw socket (then EOF if asked); read until the server closes."""
    host, port = server.url.removeprefix("http://").split(":")
    with trio.fail_after(GUARD):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            try:
                await stream.send_all(request)
                if eof:
                    await stream.send_eof()
                answer = b""
                while data := await stream.receive_some(65536):
                    answer += data
            except trio.BrokenResourceError:  # reset: closed without a word, allowed
                return b""
    return answer


async def test_any_headers_get_a_documented_answer_or_a_close(start_server, tracebacks):
    server = await start_server(CONFIG)
    good = dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})

    async def check(content_type: bytes, declared: int | None, extra: list, eof: bool) -> None:
        lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: x", b"Connection: close"]
        lines += [b"Content-Type: " + content_type] if content_type else []
        lines += [b"Content-Length: %d" % declared] if declared is not None else []
        lines += [name + b": " + value for name, value in extra]
        request = b"\r\n".join(lines) + b"\r\n\r\n" + good
        answer = await raw_exchange(server, request, eof or (declared or 0) > len(good))
        if answer:
            status = int(answer[9:12])
            assert status < 500 and (status == 200 or status in DOCUMENTED | {400}), answer[:300]
            head, _, body = answer.partition(b"\r\n\r\n")
            if status != 200 and b"application/json" in head.lower():
                assert openai_error(json.loads(body)), answer[:300]
        await idle(server, tracebacks)

    @FUZZ
    # A body longer than its Content-Length, answered early (415): hypercorn's
    # h11 reads the extra bytes as a bad next request and sends its 400 while
    # the connection is being closed (send_eof outside its send lock), and the
    # BusyResourceError that follows ends the whole server, not one connection.
    @example(content_type=b"text/plain", declared=10, extra=[], eof=False)
    @given(
        content_type=HEADER_BYTES,
        declared=st.one_of(st.none(), st.just(len(good)), st.integers(0, 2 * len(good))),
        extra=st.lists(st.tuples(st.binary(min_size=1, max_size=10), st.binary(max_size=20)), max_size=3),
        eof=st.booleans(),
    )
    def run(token, content_type, declared, extra, eof):
        in_loop(token, check, content_type, declared, extra, eof)

    await fuzz(check, run)
    assert tracebacks() == []


# -- WebSocket messages ----------------------------------------------------------------------------
WS_CHAT = body_of(
    {"type": st.just("chat"), "messages": MESSAGES},
    {"max_tokens": MAX_TOKENS, "simulate": SIMULATE, "backpressure": maybe(st.sampled_from(["pause"]))},
)
WS_MESSAGE = st.one_of(
    WS_CHAT.map(json.dumps),
    st.just('{"type":"cancel"}'),
    st.builds(lambda v: json.dumps({"type": v}), ANY_JSON),
    TEXT,  # not JSON at all (a lone surrogate cannot be sent as UTF-8: kept out of text frames)
    st.binary(max_size=20),
).filter(
    lambda m: not isinstance(m, str) or m.encode("utf-8", "surrogatepass") == m.encode("utf-8", "replace")
)
SERVER_TYPES = {"token", "done", "cancelled", "error"}
CLOSE_CODES = {1000, 1001, 1003, 1008, 1009}


async def test_any_websocket_messages_get_documented_answers(start_server, tracebacks):
    server = await start_server(CONFIG)

    async def check(messages: list, then_close: bool) -> None:
        with trio.fail_after(GUARD):
            async with open_websocket_url(server.url.replace("http", "ws", 1) + "/v1/ws/chat") as ws:
                try:
                    for message in messages:
                        await ws.send_message(message)
                    if then_close:  # leave at once, whatever the turn is doing
                        return
                    # A cancel at an odd time, then a sentinel: the reader answers in
                    # order, so every reply to our messages comes before the sentinel's.
                    await ws.send_message('{"type":"cancel"}')
                    await ws.send_message('{"type":"sentinel"}')
                    while True:
                        reply = json.loads(await ws.get_message())
                        assert reply["type"] in SERVER_TYPES, reply
                        if reply["type"] == "error":
                            assert openai_error(reply), reply
                            if "sentinel" in reply["error"]["message"]:
                                break
                except ConnectionClosed as closed:
                    assert closed.reason.code in CLOSE_CODES, closed.reason
        await idle(server, tracebacks)

    @FUZZ
    @given(messages=st.lists(WS_MESSAGE, min_size=1, max_size=3), then_close=st.booleans())
    def run(token, messages, then_close):
        in_loop(token, check, messages, then_close)

    await fuzz(check, run)
    assert tracebacks() == []


async def test_a_body_longer_than_its_content_length_does_not_end_the_server(start_server, tracebacks):
    """Found by the header fuzz above (its @example): the 415 and hypercorn's
    400 for the extra bytes race on one socket, and the loser's
    BusyResourceError escaped hypercorn's connection handler and ended
    every connection of the server.  A race: 50 tries (it took 3-12 here)."""
    server = await start_server(CONFIG)
    good = dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    request += b"Content-Type: text/plain\r\nContent-Length: 10\r\n\r\n" + good
    for _ in range(50):
        answer = await raw_exchange(server, request, eof=False)
        assert answer == b"" or int(answer[9:12]) in DOCUMENTED, answer[:300]
    assert tracebacks() == []
    async with httpx.AsyncClient(trust_env=False) as http:  # and the server still serves
        assert (await http.get(server.url + "/v1/models")).status_code == 200
