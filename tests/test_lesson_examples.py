"""Every claim in lessons 00-02, and lesson 14's that no other test runs, executed (STYLE §6, §8).

Each test names the lesson section whose claim it checks.  Tests that state
a *formula* about time (lesson 00) run under trio's ``autojump_clock``: the
server, the model and the client share one virtual clock, so a 500 ms TTFT
is exactly 0.5 s on the trace and takes no real time, and the assertions
compare exact virtual times instead of racing a wall clock.  Everything else
uses real time and asserts only order and content, never durations.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import trio
from conftest import chat_body

from refimpl.app import serve
from refimpl.client import StreamError, stream_chat
from refimpl.config import Config
from refimpl.examples import cut_at_60s
from refimpl.examples.clients import httpx_sse_text, openai_sdk_text
from refimpl.examples.naive_sse import line_buffered_data, naive_data
from refimpl.examples.sse_tour import TOUR
from refimpl.examples.timing import time_full, time_streamed
from refimpl.model import ModelRequest, Simulate
from refimpl.protocols.sse_chat import ChunkFramer, dumps
from refimpl.sse import Event, SSEParser, encode

ROOT = Path(__file__).resolve().parent.parent
EXACT = 1e-6  # virtual-clock arithmetic is exact up to float rounding


def parse_all(chunks: list[bytes]) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return events + parser.close(), parser


async def raw_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        raw = b"".join([chunk async for chunk in resp.aiter_raw()])
    return resp, raw


def chunks_of(raw: bytes) -> list[dict | str]:
    """Parsed SSE data of a chat stream: dicts for JSON, the string for [DONE]."""
    events, _ = parse_all([raw])
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in events]


# ---------------------------------------------------------------------------
# Lesson 00: why streaming
# ---------------------------------------------------------------------------
SLOW = Simulate(ttft_ms=500, itl_ms=100, tokens=10)


def offsets(trace: dict) -> dict[str, float]:
    """Seconds from ``accepted`` to each event of a trace (first of each name)."""
    t0 = trace["events"][0]["at"]
    out: dict[str, float] = {}
    for event in trace["events"]:
        out.setdefault(event["name"], event["at"] - t0)
    return out


async def test_00_full_vs_streamed_ttft(start_server, client, autojump_clock):
    """'TTFT of a full response is its e2e; a stream's is the model's TTFT.'"""
    server = await start_server(Config(simulate=SLOW))
    ttft, itl, n = SLOW.ttft_ms / 1000, SLOW.itl_ms / 1000, SLOW.tokens
    e2e = ttft + (n - 1) * itl  # the formula lesson 00 states

    full = await time_full(client, server.url, chat_body())
    streamed = await time_streamed(client, server.url, chat_body())

    assert full.ttft == pytest.approx(e2e, abs=EXACT)
    assert full.e2e == pytest.approx(e2e, abs=EXACT)
    assert streamed.ttft == pytest.approx(ttft, abs=EXACT)
    assert streamed.e2e == pytest.approx(e2e, abs=EXACT)
    # Token k (1-based) is visible at ttft + (k-1) * itl.
    assert [at for at, _ in streamed.arrivals] == pytest.approx([ttft + k * itl for k in range(n)], abs=EXACT)
    assert streamed.text == full.text  # same prompt, same seed, same words

    # The model did the same work both times; the trace shows it.
    for timing in (full, streamed):
        trace = await server.trace(timing.id)
        assert [e["name"] for e in trace["events"]] == ["accepted", "first_token", "done"]
        assert offsets(trace)["first_token"] == pytest.approx(ttft, abs=EXACT)
        assert offsets(trace)["done"] == pytest.approx(e2e, abs=EXACT)
        assert trace["events"][-1]["tokens"] == n == trace["completion_tokens"]


async def test_00_first_byte_is_not_first_token(start_server, client, autojump_clock):
    """'The headers and the role chunk arrive at once: TTFB is not TTFT.'"""
    server = await start_server(Config(simulate=SLOW))
    start = trio.current_time()
    events = [e async for e in stream_chat(client, server.url, chat_body())]
    assert events[0].content == "" and events[0].at - start == pytest.approx(0, abs=EXACT)
    first_content = next(e for e in events if e.content)
    assert first_content.at - start == pytest.approx(SLOW.ttft_ms / 1000, abs=EXACT)


async def test_00_max_tokens_cuts_e2e(start_server, client, autojump_clock):
    """Push on it: max_tokens below the knob ends early with finish_reason 'length'."""
    server = await start_server(Config(simulate=SLOW))
    timing = await time_streamed(client, server.url, chat_body(max_tokens=4))
    trace = await server.trace(timing.id)
    assert trace["finish_reason"] == "length" and trace["completion_tokens"] == 4
    assert timing.e2e == pytest.approx(0.5 + 3 * 0.1, abs=EXACT)


async def test_00_trace_order_in_real_time(server, client):
    """Without a mock clock only the order is guaranteed, and it holds."""
    timing = await time_streamed(client, server.url, chat_body())
    events = (await server.trace(timing.id))["events"]
    stamps = [e["at"] for e in events]
    assert [e["name"] for e in events] == ["accepted", "first_token", "done"]
    assert stamps == sorted(stamps)


# ---------------------------------------------------------------------------
# Lesson 01: the SSE wire format and the parser
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("wire", "expected"), TOUR, ids=[repr(w)[2:-1] for w, _ in TOUR])
def test_01_tour(wire, expected):
    """The tour table: whole, byte by byte, and cut in two everywhere."""
    assert parse_all([wire])[0] == expected
    assert parse_all([wire[i : i + 1] for i in range(len(wire))])[0] == expected
    for cut in range(len(wire) + 1):
        assert parse_all([wire[:cut], wire[cut:]])[0] == expected


def test_01_tour_size():
    assert len(TOUR) == 16  # lesson 01: "the whole format as sixteen byte strings"


def test_01_retry_and_last_event_id():
    _, parser = parse_all([b"retry: 2500\ndata: hi\n\n"])
    assert parser.retry == 2500
    _, parser = parse_all([b"id: 7\ndata: a\n\ndata: b\n\n"])
    assert parser.last_event_id == "7"


def test_01_naive_crlf_hides_done():
    """'[DONE] arrives as "[DONE]\\r" and the end check never matches.'"""
    wire = b"data: [DONE]\r\n\r\n"
    assert naive_data([wire]) == ["[DONE]\r"]
    assert line_buffered_data([wire]) == ["[DONE]\r"]
    assert parse_all([wire])[0] == [Event(data="[DONE]")]


def test_01_sse_starlette_writes_crlf():
    """'A FastAPI + sse-starlette server ends lines with CRLF by default.'"""
    sse = pytest.importorskip("sse_starlette.sse")
    wire = sse.ServerSentEvent(data="[DONE]").encode()
    assert wire == b"data: [DONE]\r\n\r\n"
    assert naive_data([wire]) == ["[DONE]\r"]


def test_01_event_split_across_reads():
    """'The first half is broken JSON, the second half is silently dropped.'"""
    wire = encode(json.dumps({"choices": [{"delta": {"content": "Hello"}}]}))
    cut = wire.index(b"Hel") + 3
    halves = [wire[:cut], wire[cut:]]
    (first,) = naive_data(halves)
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    assert line_buffered_data(halves) == [wire.decode()[6:-2]]
    assert parse_all(halves)[0] == parse_all([wire])[0]


def test_01_utf8_split_across_reads():
    """'A character cut in two makes bytes.decode raise.'"""
    wire = "data: café\n\n".encode()
    cut = wire.index("é".encode()) + 1
    halves = [wire[:cut], wire[cut:]]
    with pytest.raises(UnicodeDecodeError):
        naive_data(halves)
    assert line_buffered_data(halves) == ["café"]
    assert parse_all(halves)[0] == [Event(data="café")]


def test_01_multiline_data_and_error_events():
    """'Two lines of one event become two events; event: error is invisible.'"""
    assert naive_data([b"data: a\ndata: b\n\n"]) == ["a", "b"]
    assert line_buffered_data([b"data: a\ndata: b\n\n"]) == ["a", "b"]
    error = b'event: error\ndata: {"error": {}}\n\n'
    assert naive_data([error]) == ['{"error": {}}']  # just more data to it
    assert parse_all([error])[0][0].type == "error"


async def test_01_naive_readers_against_our_server(server, client):
    """'line_buffered_data survives our server in any chunking; naive_data
    does not survive byte-by-byte delivery.'"""
    _, raw = await raw_stream(client, server.url, chat_body(stream=True))
    one_by_one = [raw[i : i + 1] for i in range(len(raw))]
    truth = [e.data for e in parse_all([raw])[0]]
    assert line_buffered_data([raw]) == truth == line_buffered_data(one_by_one)
    assert naive_data([raw]) == truth
    assert naive_data(one_by_one) == []


# ---------------------------------------------------------------------------
# Lesson 02: the OpenAI-compatible endpoint and its clients
# ---------------------------------------------------------------------------
async def test_02_headers_http11(server, client):
    resp, raw = await raw_stream(client, server.url, chat_body(stream=True))
    assert resp.http_version == "HTTP/1.1"
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["connection"] == "keep-alive"
    ids = {c["id"] for c in chunks_of(raw) if isinstance(c, dict)}
    assert ids == {resp.headers["x-request-id"]}


def curl(*args: str) -> str:
    out = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (.ci/run installs it)")


@needs_curl
async def test_02_headers_http2_have_no_connection(server):
    """'Connection: keep-alive on HTTP/1.1 only (HTTP/2 forbids it).'"""
    pytest.importorskip("h2")
    args = [
        "-N",
        "-D",
        "-",
        "--http2-prior-knowledge",
        server.url + "/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(chat_body(stream=True)),
    ]
    out = await trio.to_thread.run_sync(partial(curl, *args))
    head, _, body = out.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/2 200")
    names = {line.split(":")[0].lower() for line in head.splitlines()[1:]}
    assert {"cache-control", "x-accel-buffering", "x-request-id"} <= names
    assert "connection" not in names
    assert body.endswith("data: [DONE]\n\n")


async def test_02_chunk_sequence_with_usage(server, client):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    _, raw = await raw_stream(client, server.url, body)
    *chunks, done = chunks_of(raw)
    role, *content, final, usage = chunks
    assert done == "[DONE]"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(content)
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + len(content)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_02_no_usage_key_unless_asked(server, client):
    _, raw = await raw_stream(client, server.url, chat_body(stream=True))
    chunks = chunks_of(raw)
    assert chunks[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks[:-1])


async def test_02_mid_stream_error(server, client):
    """'event: error with the OpenAI error object, then the end: no [DONE].'"""
    simulate = {"fail_after_tokens": 2, "fail_with": "overloaded"}
    resp, raw = await raw_stream(client, server.url, chat_body(stream=True, simulate=simulate))
    assert resp.status_code == 200  # the status left before the failure
    events, _ = parse_all([raw])
    assert [e.type for e in events] == ["message"] * 3 + ["error"]
    error = json.loads(events[-1].data)["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"
    assert b"[DONE]" not in raw
    trace = await server.trace(resp.headers["x-request-id"])
    assert trace["events"][-1]["name"] == "error"
    assert trace["events"][-1]["detail"] == "overloaded"

    with pytest.raises(StreamError) as caught:
        _ = [e async for e in stream_chat(client, server.url, chat_body(simulate=simulate))]
    assert caught.value.error["code"] == "overloaded"
    with pytest.raises(RuntimeError):
        await httpx_sse_text(client, server.url, chat_body(simulate=simulate))
    with pytest.raises(openai.APIError):
        await trio.to_thread.run_sync(openai_sdk_text, server.url, "Hello", simulate)


async def test_02_error_before_stream_is_http_status(server, client):
    resp = await client.post(
        server.url + "/v1/chat/completions", json=chat_body(simulate={"fail_after_tokens": 0})
    )
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "model_error"


@pytest.mark.parametrize(
    ("change", "status", "param", "code"),
    [
        ({"model": None}, 400, "model", "missing_required_parameter"),
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": []}, 400, "messages", "invalid_value"),
        ({"stream": "yes"}, 400, "stream", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
        ({"n": 2}, 400, "n", "invalid_value"),
        ({"simulate": {"tokns": 3}}, 400, "simulate.tokns", "unknown_parameter"),
        ({"simulate": {"itl_ms": -1}}, 400, "simulate.itl_ms", "invalid_value"),
    ],
)
async def test_02_request_validation(server, client, change, status, param, code):
    resp = await client.post(server.url + "/v1/chat/completions", json={**chat_body(), **change})
    assert resp.status_code == status
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["type"] == "invalid_request_error"


async def test_02_bad_body_errors(server, client):
    url = server.url + "/v1/chat/completions"
    resp = await client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_json")
    resp = await client.post(url, content=b"{}", headers={"content-type": "text/plain"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (415, "unsupported_media_type")


async def test_02_simulate_knobs(server, client):
    async def text(**simulate) -> tuple[str, int]:
        resp = await client.post(server.url + "/v1/chat/completions", json=chat_body(simulate=simulate))
        answer = resp.json()
        return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]

    assert (await text(tokens=5))[1] == 5
    assert await text(seed=1) == await text(seed=1)
    assert (await text(seed=1))[0] != (await text(seed=2))[0]


async def test_02_stream_outlives_quart_response_timeout(start_server, client, autojump_clock):
    """'Quart cuts a response at 60 s unless response.timeout = None.'"""
    server = await start_server(simulate=Simulate(ttft_ms=0, itl_ms=1000, tokens=65))
    start = trio.current_time()
    events = [e async for e in stream_chat(client, server.url, chat_body())]
    assert sum(1 for e in events if e.content) == 65
    assert trio.current_time() - start == pytest.approx(64, abs=EXACT)


async def test_02_forgetting_the_timeout_cuts_at_60s(nursery, autojump_clock):
    """The broken/fixed pair of refimpl/examples/cut_at_60s.py."""
    for fixed, seconds, n_events in ((False, 60, 59), (True, 90, 91)):
        url = await nursery.start(partial(serve, cut_at_60s.create_app(fixed=fixed)))
        start = trio.current_time()
        parser, events = SSEParser(), []
        async with httpx.AsyncClient(timeout=None) as client, client.stream("GET", f"{url}/ticks/90") as resp:
            try:
                async for raw in resp.aiter_raw():
                    events += parser.feed(raw)
                cut = False
            except httpx.RemoteProtocolError as err:
                assert "peer closed connection without sending complete message body" in str(err)
                cut = True
        assert cut is not fixed
        assert trio.current_time() - start == pytest.approx(seconds, abs=EXACT)
        assert len(events) == n_events
        assert (events[-1].data == "[DONE]") is fixed


@needs_curl
async def test_02_curl(server):
    script = ROOT / "refimpl" / "examples" / "curl_stream.sh"
    out = await trio.to_thread.run_sync(curl_script, script, server.url)
    events = [e.data for e in parse_all([out.encode()])[0]]
    assert events[-1] == "[DONE]"
    assert sum(1 for d in events[:-1] if json.loads(d)["choices"][0]["delta"].get("content")) == 3


def curl_script(script: Path, url: str) -> str:
    out = subprocess.run(["sh", str(script), url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_02_clients_agree(server, client):
    """Our client, httpx-sse and the openai SDK (streamed and not) read the
    same text; the SDK's usage matches the non-streamed usage."""
    simulate = {"tokens": 12, "seed": 3}
    body = chat_body(simulate=simulate)
    ours = "".join([e.content async for e in stream_chat(client, server.url, body)])
    assert await httpx_sse_text(client, server.url, body) == ours
    sdk_text, sdk_usage = await trio.to_thread.run_sync(openai_sdk_text, server.url, "Hello", simulate)
    assert sdk_text == ours

    def sdk_full():
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        return sdk.chat.completions.create(
            model="refimpl-sim",
            messages=[{"role": "user", "content": "Hello"}],
            extra_body={"simulate": simulate},
        )

    full = await trio.to_thread.run_sync(sdk_full)
    assert full.choices[0].message.content == ours
    assert full.usage.model_dump() == sdk_usage.model_dump()


def test_02_client_needs_done():
    """'A body that ends without [DONE] is an error to our client, not to the SDK.'"""
    body = encode(
        json.dumps(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "refimpl-sim",
                "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
            }
        )
    )

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))

    async def ours():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport) as c:
            return [e async for e in stream_chat(c, "http://test", chat_body())]

    with pytest.raises(StreamError) as caught:
        trio.run(ours)
    assert caught.value.error["code"] == "incomplete"

    sdk = openai.OpenAI(
        base_url="http://test/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    stream = sdk.chat.completions.create(model="refimpl-sim", messages=[], stream=True)
    chunks = list(stream)  # no exception: the SDK stops quietly
    assert [c.choices[0].delta.content for c in chunks] == ["Hi"]
    assert chunks[-1].choices[0].finish_reason is None  # the only clue


async def test_02_pre_encoded_chunks_equal_json_dumps(server):
    """'Pre-encoding gives the same JSON as json.dumps of the whole chunk, and
    a newline inside a token stays inside one data: line.'"""
    gen = server.engine.start(ModelRequest(messages=(("user", "hi"),)), "sse")
    framer = ChunkFramer(gen, include_usage=True)
    tokens = ["Hello", ' "quoted"', "\nnew line", " café", "\u2028"]
    wire = framer.content(tokens)
    events, _ = parse_all([wire])
    assert len(events) == len(tokens) == wire.count(b"\n\n")
    for token, event in zip(tokens, events, strict=False):
        expected = framer._chunk({"content": token}, None)
        assert event.data == dumps(expected)  # byte for byte, not just parsed
    assert " café".encode() in wire  # non-ASCII leaves as raw UTF-8, as dumps does
    gen.cancel("client_disconnect")


async def test_02_ready_takes_everything_already_due(start_server, autojump_clock):
    """generation-pull: with itl_ms=0 one ready() returns every token; with
    itl_ms>0 it returns [] until the next token is due."""
    server = await start_server()

    def request(itl_ms: float) -> ModelRequest:
        sim = Simulate(ttft_ms=0, itl_ms=itl_ms, tokens=5)
        return ModelRequest(messages=(("user", "hi"),), simulate=sim)

    fast = server.engine.start(request(0), "sse")
    assert len(fast.ready(64)) == 5
    slow = server.engine.start(request(50), "sse")
    assert len(await slow.wait(64)) == 1
    assert slow.ready(64) == []
    await trio.sleep(0.05)
    assert len(slow.ready(64)) == 1
    for gen in (fast, slow):
        gen.cancel("client_disconnect")


def test_01_naive_drops_valid_fields():
    """'data:x with no space, a leading BOM and the no-colon data line are dropped.'"""
    for wire in (b"data:hi\n\n", b"\xef\xbb\xbfdata: hi\n\n", b"data\n\n"):
        assert naive_data([wire]) == line_buffered_data([wire]) == []
        assert len(parse_all([wire])[0]) == 1


def test_01_last_event_id_rules():
    """'An event that delivers nothing still moves the ID; an id: in an event
    cut off before its empty line never becomes the last event ID.'"""
    events, parser = parse_all([b"id: 9\n\n"])
    assert events == [] and parser.last_event_id == "9"
    events, parser = parse_all([b"id: 5\ndata: x\n"])
    assert events == [] and parser.last_event_id == ""


def test_01_crlf_split_across_reads_is_one_line_ending():
    """Push on it 1: the LF after a chunk-final CR is not a second line ending."""
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r\n") == [Event(data="x")]


def test_01_retry_needs_ascii_digits():
    _, parser = parse_all([b"retry: 2500ms\n\n"])
    assert parser.retry is None
    _, parser = parse_all([b"retry: 2500\n\n"])
    assert parser.retry == 2500


def test_01_encoder_promises():
    """'CR and CRLF in data come back as LF; a line break in an id is refused.'"""
    assert parse_all([encode("a\r\nb\rc\nd")])[0] == [Event(data="a\nb\nc\nd")]
    with pytest.raises(ValueError):
        encode("x", id="1\n2")
    with pytest.raises(ValueError):
        encode("x", event="a\rb")


def test_00_server_defaults_in_the_lesson():
    """Lesson 00 computes 200 + 63 x 20 = 1,460 ms from these defaults."""
    s = Simulate()
    assert (s.ttft_ms, s.itl_ms, s.tokens) == (200, 20, 64)
    assert s.ttft_ms + (s.tokens - 1) * s.itl_ms == 1460


@needs_curl
async def test_02_curl_on_an_unfinished_chunked_body(nursery):
    """'curl says: transfer closed with outstanding read data remaining.'

    A bare TCP server sends what the broken app of cut_at_60s.py sends at
    60 s: a chunked response whose closing empty chunk never comes."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        event = encode("0")
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(event), event)
        )
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    cmd = ["curl", "-sSN", f"http://127.0.0.1:{port}/"]
    run = partial(subprocess.run, cmd, capture_output=True, text=True, timeout=30)
    out = await trio.to_thread.run_sync(run)
    assert out.stdout == "data: 0\n\n"
    assert out.returncode == 18
    assert "transfer closed with outstanding read data remaining" in out.stderr


def test_02_openai_sdk_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(openai.OpenAIError):
        openai.OpenAI(base_url="http://127.0.0.1:1/v1")


async def test_02_fail_at_token_zero(server, client):
    """Push on it 2: streamed, the 200 and the role chunk are already out."""
    body = chat_body(stream=True, simulate={"fail_after_tokens": 0})
    resp, raw = await raw_stream(client, server.url, body)
    events, _ = parse_all([raw])
    assert resp.status_code == 200
    assert [e.type for e in events] == ["message", "error"]


async def test_00_real_time_is_never_ahead_of_the_formula(start_server, client):
    """'In real time e2e comes out a little above the formula, never below.'"""
    sim = Simulate(ttft_ms=20, itl_ms=5, tokens=10)
    server = await start_server(Config(simulate=sim))
    timing = await time_streamed(client, server.url, chat_body())
    at = offsets(await server.trace(timing.id))
    # trio never wakes a sleeper before its deadline; the stamps themselves
    # are read a few microseconds apart from the deadlines, hence the 1 ms.
    assert at["first_token"] >= sim.ttft_ms / 1000 - 1e-3
    assert at["done"] >= (sim.ttft_ms + (sim.tokens - 1) * sim.itl_ms) / 1000 - 1e-3


def test_02_cut_at_60s_runs_as_a_script():
    """Push on it 5: `python -m refimpl.examples.cut_at_60s PORT` serves the app."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "refimpl.examples.cut_at_60s", "--fixed", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        assert line.startswith("fixed: curl -N http://127.0.0.1:"), line
        url = line.split()[-1].replace("/61", "/1")
        assert httpx.get(url, timeout=10).text == "data: 0\n\ndata: [DONE]\n\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------
# Lesson 14: the production checklist
# ---------------------------------------------------------------------------
LESSON_14 = ROOT / "lessons" / "14-production.md"
WIRE_MESSAGES = [{"role": "user", "content": "Why stream?"}]
#: The requests of lesson 14's "The same answer on the wire", in the order of its blocks.
WIRE_ASKS = {
    "/v1/chat/completions": {"messages": WIRE_MESSAGES, "stream_options": {"include_usage": True}},
    "/v1/messages": {"messages": WIRE_MESSAGES, "max_tokens": 100},
    "/v1/responses": {"input": "Why stream?"},
}
#: What differs between two runs of the same request: ids and clocks.
VOLATILE = [
    (re.compile(r"chatcmpl-[0-9a-f]+"), "chatcmpl-ID"),
    (re.compile(r"msg_[0-9a-f]+"), "msg_ID"),
    (re.compile(r'"(created|created_at|completed_at)":\d+'), r'"\1":TIME'),
]


def stable(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text.strip("\n")


def lesson_14_blocks(after: str, count: int) -> list[str]:
    """The first ``count`` ```text blocks after the heading ``after``."""
    text = LESSON_14.read_text()
    text = text[text.index(after) :]
    return re.findall(r"^```text\n(.*?)^```$", text, re.M | re.S)[:count]


async def test_14_the_three_dialects_on_the_wire(start_server, client, autojump_clock):
    """'These are the bytes each client received, whole', ids and clocks
    aside, for the answer and for the failure; the sizes and the bytes per
    token event the lesson states."""
    server = await start_server(Config(heartbeat=0.2))
    blocks = lesson_14_blocks("### The same answer on the wire", 6)
    text = LESSON_14.read_text()
    token_events = []
    for n, extra in enumerate(({}, {"fail_after_tokens": 1, "fail_with": "overloaded"})):
        for m, (path, ask) in enumerate(WIRE_ASKS.items()):
            simulate = {"seed": 7, "tokens": 2, "ttft_ms": 300, "itl_ms": 10, **extra}
            body = {"model": "refimpl-sim", "stream": True, "simulate": simulate, **ask}
            async with client.stream("POST", server.url + path, json=body) as resp:
                raw = b"".join([chunk async for chunk in resp.aiter_raw()]).decode()
            if extra:  # the lesson shows a failure from its error event on
                raw = raw[raw.index("event: error") :]
            else:
                assert f"{len(raw.encode()):,} bytes" in text, path
                first = next(e for e in raw.split("\n\n") if re.search(r'"(content|text|delta)":"A"', e))
                token_events.append(len(first.encode()) + 2)  # and its blank line
            assert stable(raw) == stable(blocks[3 * n + m]), path
    assert token_events == [258, 116, 201]
    assert "| bytes per token event, here | 258 | 116 | 201 |" in text


def test_14_numbers_cited_from_data_and_lessons():
    """The checklist's numbers are those of the run or lesson it names."""
    text = " ".join(LESSON_14.read_text().split())
    resume = json.loads((ROOT / "lessons" / "data" / "11-resume.json").read_text())["columns"]
    same = resume["resumable, memory store"]["resume_same_ms_p50"]
    other = resume["resumable, Redis store"]["resume_other_ms_p50"]
    kept = resume["resumable, memory store"]["rss_kib_per_kept"]
    assert (
        f"the first replayed event {same:.1f} ms after the resume, {other:.1f} ms on another process" in text
    )
    assert f"a kept log costs {kept:.1f} KiB of memory" in text
    protocols = json.loads((ROOT / "lessons" / "data" / "12-protocols.json").read_text())["protocols"]
    sse, grpc_ = protocols["sse-h1"]["disconnect_ms_p50"], protocols["grpc"]["disconnect_ms_p50"]
    assert f"{sse:.2f} ms p50 on SSE, {grpc_:.2f} ms on gRPC" in text
    cited = {  # lesson 14's words -> what the lesson it cites says
        "09-cancellation.md": ("0.47 ms p50, 1.22 ms p99", "| 0.47 ms | 1.22 ms |"),
        "10-backpressure.md": (
            "at most 8 KiB of server memory growth in 10 s",
            "At most 8 KiB of growth in 10 s",
        ),
        "08-heartbeats-and-proxies.md": (
            "20 tokens over 2 s arrived in one read",
            "20 tokens over 2 s reached the",
        ),
    }
    for lesson, (ours, theirs) in cited.items():
        assert ours in text, ours
        assert theirs in " ".join((ROOT / "lessons" / lesson).read_text().split()), (lesson, theirs)
    faults = json.loads((ROOT / "lessons" / "data" / "14-faults.json").read_text())
    for kind, outcomes in faults["outcomes"].items():  # the run's table, row by row
        assert f"| {kind} | " + ", ".join(f"{o} ({c:,})" for o, c in outcomes.items()) + " |" in text, kind
    assert all(faults["invariants"].values()) and "All six invariants held" in text
    assert faults["config"]["keep_alive_timeout"] == 20 and "`--keep-alive-timeout 20`" in text
    # The broken run, with hypercorn's 5 s keep-alive: the two invariants it broke, counted.
    before = json.loads((ROOT / "lessons" / "data" / "14-faults-keepalive5.json").read_text())
    assert before["config"]["keep_alive_timeout"] == 5
    normal = [before["outcomes"][k] for k in ("sse", "openai", "ws")]
    failed = sum(c for o in normal for name, c in o.items() if name != "complete")
    assert f"{failed} of the {sum(sum(o.values()) for o in normal)} normal streams" in text
    mid = before["outcomes"]["midstream"]
    mid_bad = sum(c for name, c in mid.items() if name != "error as asked")
    assert f"{mid_bad} of the {sum(mid.values())} mid-stream failures" in text
    broke = [name for name, ok in before["invariants"].items() if not ok]
    assert broke == ["normal streams complete", "every failure documented"]  # the two the lesson names
    assert before["violations"]["count"] == failed + mid_bad
    ttft = faults["first_token_ms"]
    assert (
        f"{ttft['before']['p50_ms']:.1f} ms p50 before the run, {ttft['after']['p50_ms']:.1f} ms after"
        in text
    )
    assert f"{ttft['during']['p50_ms'] / 1000:.1f} s p50 as the load process measured it" in text
    assert f"{ttft['during, another process']['p50_ms']:.0f} ms measured from a separate process" in text
    fuzz = re.search(r'"REFIMPL_FUZZ_EXAMPLES", (\d+)', (ROOT / "tests" / "test_fuzz_server.py").read_text())
    assert f"{fuzz.group(1)} examples per test function in `make test`" in text
    assert "180 tokens per" in text and "about nine seconds and 180 tokens per departure" in " ".join(
        (ROOT / "lessons" / "09-cancellation.md").read_text().split()
    )


def test_14_the_defaults_in_the_tables():
    """'Timeouts at every hop' and 'Limits': each default the tables state."""
    from refimpl import hypercorn_limits
    from refimpl.app import hypercorn_config
    from refimpl.upstream import UpstreamModel

    c = Config()
    timers = (c.header_timeout, c.body_timeout, c.heartbeat, c.ws_ping_interval, c.ws_ping_timeout)
    assert timers == (10, 30, 15, 20, 20)
    assert (c.stall_timeout, c.generation_timeout, c.upstream_timeout, c.drain_timeout) == (30, None, 60, 10)
    limits = (c.max_messages, c.max_prompt_chars, c.max_tokens_limit, c.max_streams_per_client)
    assert limits == (1000, 1_000_000, 32_768, 64)
    assert (c.max_active, c.max_queue, c.max_connections_per_client) == (1024, 256, 256)
    assert c.ws_max_message_bytes == c.max_body_bytes == 1 << 20
    assert c.public_paths == ("/", "/static/*", "/metrics") and c.api_keys == ()
    hc = hypercorn_config("127.0.0.1", 0, connection_limits=hypercorn_limits.ConnectionLimits.of(c))
    assert (
        hc.keep_alive_timeout == c.keep_alive_timeout == 20 and hc.ssl_handshake_timeout == c.header_timeout
    )
    upstream = UpstreamModel(replace(c, upstream="http://127.0.0.1:9/v1"))
    assert (upstream.client.timeout.read, upstream.client.timeout.connect) == (60, 10)


async def test_14_stock_hypercorn_answers_a_half_sent_body_and_keeps_the_connection(
    start_server, autojump_clock
):
    """The broken version: with hypercorn's own classes (``REFIMPL_LIMITS=0``)
    a body that stops half-way gets Quart's 408 after its BODY_TIMEOUT, and
    the connection is still open long after (100 s here, on the virtual
    clock): nobody closes it."""
    import os

    from refimpl import hypercorn_limits

    before = os.environ.get("REFIMPL_LIMITS")
    os.environ["REFIMPL_LIMITS"] = "0"  # read by every install(), serve()'s included
    try:
        server = await start_server(body_timeout=60)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps(chat_body()).encode()
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + body[:10])
            answer = await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer
            assert trio.current_time() >= 60  # Quart's BODY_TIMEOUT, set from --body-timeout
            with trio.move_on_after(100) as still_open:
                while await stream.receive_some(65536):
                    pass
            assert still_open.cancelled_caught  # no EOF: it says "close", and never does
    finally:
        if before is None:
            del os.environ["REFIMPL_LIMITS"]
        else:
            os.environ["REFIMPL_LIMITS"] = before
        hypercorn_limits.install()  # the fix again, for the tests after this one


async def test_14_an_upstream_4xx_is_upstream_rejected(nursery, start_server, client):
    """'upstream_rejected, 400 (its other 4xx: the request itself)'."""
    from upstream_fixtures import garbage_upstream

    refusal = b'{"error": {"message": "no such thing", "type": "invalid_request_error"}}'
    answer = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(refusal), refusal)
    url = await garbage_upstream(nursery, answer)
    server = await start_server(upstream=url + "/v1", upstream_timeout=10)
    resp = await client.post(server.url + "/v1/chat/completions", json=chat_body())
    error = resp.json()["error"]
    assert (resp.status_code, error["code"]) == (400, "upstream_rejected") and "no such thing" in error[
        "message"
    ]


def test_14_every_test_it_cites_exists():
    """The checklist names the test that proves each item: each must exist."""
    prose = re.sub(r"^(`{3,})[^\n]*\n.*?^\1[ \t]*$", "", LESSON_14.read_text(), flags=re.M | re.S)
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    for name in set(re.findall(r"\b(test_[a-z0-9_]+)\b", prose)):
        assert name in files or re.search(rf"def {name}\b", sources), name
