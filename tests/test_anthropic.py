"""``POST /v1/messages`` (``protocols/anthropic_messages.py``, lesson 14), read
by the official ``anthropic`` SDK, unchanged, and by httpx on the wire.

What the dialect promises, each checked against a real server:

* the same generation as ``/v1/chat/completions``: for one prompt and seed
  the text and the token counts the anthropic SDK reports (streamed, via
  ``messages.stream`` and ``create(stream=True)``, and not streamed) equal
  what the openai SDK reports from the OpenAI endpoint;
* the exact events on the wire, each named and repeating its name as
  ``type``, ending with ``message_stop`` and nothing after it;
* Anthropic's stop reasons: ``end_turn``, ``max_tokens``, ``stop_sequence``
  with the sequence that matched;
* the error cases of ``patterns/`` in Anthropic's words: a failure after the
  200 is one ``error`` event (the SDK raises with our message) and no
  ``message_stop``; a heartbeat is an ``event: ping``, one per trace
  ``heartbeat``; a client that leaves cancels its generation;
* every error before the stream, ours or the framework's, in Anthropic's
  error shape with Anthropic's type for its status, raised by the SDK as
  the matching exception class.

The SDK runs on this test's own trio loop (it is built on anyio); timing
tests use trio's virtual clock (``autojump_clock``).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import anthropic
import openai
import pytest
import trio
import trio.testing
from test_websocket import running

from refimpl.backend import ModelRequest
from refimpl.model import simulated_text
from refimpl.protocols import anthropic_messages
from refimpl.protocols.anthropic_messages import EventFramer, event
from refimpl.sse import SSEParser

URL = "/v1/messages"
MODEL = "refimpl-sim"
SYSTEM = "You answer briefly."
QUESTION = "Why should tokens stream?"
MESSAGES = [{"role": "user", "content": QUESTION}]
SEED = {"simulate": {"seed": 7}}
LONG = {"simulate": {"ttft_ms": 0, "itl_ms": 5, "tokens": 100_000}}


def sdk(server, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0, **options)


def body(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": content}], **extra}


async def read_wire(client, server, request: dict) -> tuple[Any, bytes, list]:
    """One streamed request read raw: the response, its bytes, its events."""
    raw = b""
    async with client.stream("POST", server.url + URL, json=request) as resp:
        async for chunk in resp.aiter_raw():
            raw += chunk
    parser = SSEParser()
    return resp, raw, parser.feed(raw) + parser.close()


def text_of(events: list) -> str:
    datas = [json.loads(e.data) for e in events if e.type == "content_block_delta"]
    return "".join(d["delta"]["text"] for d in datas)


# -- the same generation as the OpenAI endpoint ---------------------------------------
async def test_sdk_reads_what_the_openai_endpoint_sends_for_the_same_prompt_and_seed(server):
    openai_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    completion = await openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, *MESSAGES],
        extra_body=SEED,
    )
    await openai_client.close()
    client = sdk(server)
    async with client.messages.stream(
        model=MODEL, max_tokens=1000, system=SYSTEM, messages=MESSAGES, extra_body=SEED
    ) as stream:
        pieces = [piece async for piece in stream.text_stream]
        streamed = await stream.get_final_message()
    # The system prompt as text blocks, the question too: the same prompt.
    blocks = [{"type": "text", "text": QUESTION[:9]}, {"type": "text", "text": QUESTION[9:]}]
    whole = await client.messages.create(
        model=MODEL,
        max_tokens=1000,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": blocks}],
        extra_body=SEED,
    )
    raw = await client.messages.create(
        model=MODEL, max_tokens=1000, system=SYSTEM, messages=MESSAGES, stream=True, extra_body=SEED
    )
    events = [e async for e in raw]
    await client.close()

    expected = completion.choices[0].message.content
    assert "".join(pieces) == expected and len(pieces) == completion.usage.completion_tokens
    for message in (streamed, whole):
        assert [(b.type, b.text) for b in message.content] == [("text", expected)]
        assert (message.usage.input_tokens, message.usage.output_tokens) == (
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
        )
        assert message.stop_reason == "end_turn" and message.stop_sequence is None
        assert message.role == "assistant" and message.model == MODEL
    assert whole._request_id == whole.id  # the request-id header is the generation's id
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == expected
    assert events[-2].usage.output_tokens == completion.usage.completion_tokens


# -- the wire --------------------------------------------------------------------------
async def test_the_events_on_the_wire_in_order(server, client):
    resp, raw, events = await read_wire(client, server, body(stream=True, simulate={"tokens": 5}))
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    gen_id = resp.headers["x-request-id"]
    assert resp.headers["request-id"] == gen_id
    names = [e.type for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(e.data) for e in events]
    assert [d["type"] for d in datas] == names  # every event repeats its name
    start, block, *_, stop, delta, end = datas
    assert start["message"] == {
        "id": gen_id,
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    }
    assert block == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert text_of(events) == "".join(simulated_text("Hello", 0)[:5])
    assert stop == {"type": "content_block_stop", "index": 0}
    assert delta == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 1, "output_tokens": 5},
    }
    assert end == {"type": "message_stop"}
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert b"[DONE]" not in raw and b": ping" not in raw
    trace = await server.trace(gen_id)
    assert trace["events"][-1]["name"] == "done" and trace["completion_tokens"] == 5


async def test_pre_encoded_deltas_are_the_plain_encoding(server):
    """The framer's template (prefix + escaped text + suffix) gives the same
    bytes as encoding each event whole, for text JSON must escape."""
    gen = server.engine.start(ModelRequest(messages=(("user", "Hi"),)), "sse")
    tokens = ['say "hi"', "a\nb", "back\\slash", "é ✓", "\u2028", "\x00"]
    plain = b"".join(
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": t}) for t in tokens
    )
    assert EventFramer(gen).content(tokens) == plain
    gen.cancel("client_disconnect")


# -- stop reasons ----------------------------------------------------------------------
async def test_max_tokens_is_the_stop_reason_max_tokens(server):
    client = sdk(server)
    async with client.messages.stream(model=MODEL, max_tokens=3, messages=MESSAGES) as stream:
        message = await stream.get_final_message()
    whole = await client.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    for m in (message, whole):
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3 and m.stop_sequence is None
        assert m.content[0].text == "".join(simulated_text(QUESTION, 0)[:3])


async def test_a_stop_sequence_ends_before_it_and_is_named(server):
    tokens = simulated_text(QUESTION, 0)
    stop = tokens[4]  # a word the model writes (with its leading space)
    text = "".join(tokens[:24])
    expected = text[: text.index(stop)]
    client = sdk(server)
    stops = ["never written", stop]
    async with client.messages.stream(
        model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=stops
    ) as s:
        streamed = await s.get_final_message()
    whole = await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=stops)
    for m in (streamed, whole):
        assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
        assert m.content[0].text == expected and stop not in m.content[0].text
    # A stop sequence the model never writes: it ends its turn as usual.
    never = await client.messages.create(
        model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["zzz"]
    )
    assert (never.stop_reason, never.stop_sequence) == ("end_turn", None)


# -- errors after the 200 ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("overloaded", "overloaded_error"),
        ("model_error", "api_error"),
        ("timeout", "timeout_error"),
        ("content_filter", "invalid_request_error"),
    ],
)
async def test_a_mid_stream_failure_is_an_error_event_and_the_sdk_raises_it(server, client, code, kind):
    fail = {"simulate": {"fail_after_tokens": 3, "fail_with": code}}
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with sdk(server).messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_body=fail
        ) as s:
            async for piece in s.text_stream:
                seen.append(piece)
    err = raised.value
    message = f"The model failed while generating ({code})."
    assert (err.type, err.api_message) == (kind, message)
    assert seen == simulated_text(QUESTION, 0)[:3]  # what came before the failure
    # On the wire: the error is the last event, and message_stop never comes.
    resp, raw, events = await read_wire(client, server, body(stream=True, **fail))
    assert [e.type for e in events][-2:] == ["content_block_delta", "error"]
    gen_id = resp.headers["x-request-id"]
    error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": gen_id}
    assert json.loads(events[-1].data) == error
    assert b"message_stop" not in raw and b"message_delta" not in raw
    trace = await server.trace(gen_id)
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", code)


async def test_a_crash_is_an_api_error_without_its_text(server, client):
    _, raw, events = await read_wire(
        client, server, body(stream=True, simulate={"fail_after_tokens": 2, "fail_with": "crash"})
    )
    error = json.loads(events[-1].data)["error"]
    assert error == {"type": "api_error", "message": "The server had an error while generating the response."}
    assert b"simulated crash" not in raw and b"message_stop" not in raw


async def test_a_generation_the_server_stops_ends_with_an_overloaded_error_event(server):
    """Shutdown's last resort (``Engine.cancel_all``): an error event, the
    body ends; the SDK raises."""
    slow = {"simulate": {"ttft_ms": 60_000}}
    async with trio.open_nursery() as nursery:
        errors: list[anthropic.APIStatusError] = []

        async def read() -> None:
            with pytest.raises(anthropic.APIStatusError) as raised:
                async with sdk(server).messages.stream(
                    model=MODEL, max_tokens=9, messages=MESSAGES, extra_body=slow
                ) as s:
                    await s.get_final_message()
            errors.append(raised.value)

        nursery.start_soon(read)
        with trio.fail_after(10):
            while not server.engine.active:
                await trio.testing.wait_all_tasks_blocked()
        server.engine.cancel_all("shutdown")
    (err,) = errors
    assert err.type == "overloaded_error" and "shutting down" in err.api_message


# -- heartbeat and cancellation ---------------------------------------------------------------
async def test_pings_while_the_first_token_is_awaited_are_the_traces_heartbeats(
    start_server, client, autojump_clock
):
    """Heartbeat 1 s, first token after 3.5 s: silent at t = 1, 2 and 3, so
    three ``ping`` events between the block's start and the first delta,
    each a ``heartbeat`` in the trace; the SDK skips them."""
    server = await start_server(heartbeat=1.0)
    slow = {"simulate": {"ttft_ms": 3500, "itl_ms": 0, "tokens": 4}}
    resp, raw, events = await read_wire(client, server, body(stream=True, **slow))
    names = [e.type for e in events]
    assert names[:5] == ["message_start", "content_block_start", "ping", "ping", "ping"]
    assert [json.loads(e.data) for e in events if e.type == "ping"] == [{"type": "ping"}] * 3
    assert raw.count(b'event: ping\ndata: {"type":"ping"}\n\n') == 3
    trace = await server.trace(resp.headers["x-request-id"])
    assert [e["name"] for e in trace["events"]].count("heartbeat") == 3
    async with sdk(server).messages.stream(
        model=MODEL, max_tokens=9, messages=MESSAGES, extra_body=slow
    ) as s:
        message = await s.get_final_message()
    assert message.content[0].text == "".join(simulated_text(QUESTION, 0)[:4])


async def test_a_client_that_leaves_cancels_its_generation(server):
    seen: list[str] = []
    async with sdk(server).messages.stream(
        model=MODEL, max_tokens=20_000, messages=MESSAGES, extra_body=LONG
    ) as s:
        (gen,) = server.engine.active.values()
        async for piece in s.text_stream:
            seen.append(piece)
            if len(seen) == 3:
                break
    with trio.fail_after(10):
        await gen.ended.wait()
    last = gen.trace.events[-1]
    assert (last.name, last.detail) == ("cancelled", "client_disconnect")
    assert not server.engine.active


async def test_a_client_that_stops_reading_is_dropped_by_the_stall_guard(start_server):
    """The response is ``sse_chat.event_stream``'s, stall guard included: a
    peer with a 4 KiB window that reads nothing is dropped after
    ``--stall-timeout`` and its generation cancelled(stall_timeout)."""
    server = await start_server(stall_timeout=0.3, max_tokens_limit=10**7)
    payload = json.dumps(
        body(stream=True, max_tokens=10**7, simulate={"ttft_ms": 0, "itl_ms": 0, "tokens": 10**7})
    )
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with trio.socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        await sock.connect((host, int(port)))
        head = f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        await trio.SocketStream(sock).send_all(
            f"{head}Content-Length: {len(payload)}\r\n\r\n{payload}".encode()
        )
        gen = await running(server)
        with trio.fail_after(10):
            await gen.ended.wait()  # never read a byte
    last = gen.trace.events[-1]
    assert (last.name, last.detail) == ("cancelled", "stall_timeout")
    assert gen.completion_tokens < 10**5 and not server.engine.active  # the model stopped


async def test_coalesce_sends_the_same_text(server):
    """A backpressure policy rides in the body, as on /v1/chat/completions."""
    client = sdk(server)
    plain = await client.messages.create(model=MODEL, max_tokens=50, messages=MESSAGES)
    policy = {"backpressure": "coalesce"}
    async with client.messages.stream(model=MODEL, max_tokens=50, messages=MESSAGES, extra_body=policy) as s:
        coalesced = await s.get_final_message()
    assert coalesced.content[0].text == plain.content[0].text and coalesced.usage == plain.usage


# -- errors before the stream ---------------------------------------------------------------------
async def sdk_error(server, **changes: Any) -> anthropic.APIStatusError:
    request = {"model": MODEL, "max_tokens": 100, "messages": MESSAGES} | changes
    with pytest.raises(anthropic.APIStatusError) as raised:
        await sdk(server).messages.create(**request)
    return raised.value


@pytest.mark.parametrize(
    ("changes", "status", "cls", "says"),
    [
        ({"model": "claude-nope"}, 404, anthropic.NotFoundError, "model: claude-nope"),
        ({"max_tokens": 0}, 400, anthropic.BadRequestError, "max_tokens:"),
        ({"messages": []}, 400, anthropic.BadRequestError, "messages:"),
        ({"extra_body": {"resumable": True}}, 400, anthropic.BadRequestError, "resumable: Extra inputs"),
        ({"extra_body": {"temperature": 1.5}}, 400, anthropic.BadRequestError, "temperature:"),
        ({"extra_body": {"simulate": {"tokens": -1}}}, 400, anthropic.BadRequestError, "simulate.tokens"),
        ({"extra_body": {"backpressure": "drop"}}, 400, anthropic.BadRequestError, "backpressure"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            anthropic.BadRequestError,
            "messages.0.content.0: this server reads only text blocks, not 'image'",
        ),
        (
            {"extra_body": {"simulate": {"fail_after_tokens": 0, "fail_with": "overloaded"}}},
            503,
            anthropic.ServiceUnavailableError,
            "(overloaded)",
        ),
        (
            {"extra_body": {"simulate": {"fail_after_tokens": 0, "fail_with": "timeout"}}},
            504,
            anthropic.GatewayTimeoutError,
            "(timeout)",
        ),
        (
            {"extra_body": {"simulate": {"fail_after_tokens": 0, "fail_with": "crash"}}},
            500,
            anthropic.InternalServerError,
            "The server had an error",
        ),
    ],
)
async def test_a_bad_request_gets_anthropics_error_shape_and_sdk_class(server, changes, status, cls, says):
    err = await sdk_error(server, **changes)
    assert type(err) is cls and err.status_code == status
    assert err.type == anthropic_messages.ERROR_TYPES[status] and says in err.api_message
    assert set(err.body) <= {"type", "error", "request_id"} and err.body["type"] == "error"
    assert set(err.body["error"]) == {"type", "message"}


async def test_the_apps_own_errors_take_anthropics_shape_on_its_path(start_server, client):
    """404, 405, 413, 415 and bad JSON come from the app's shared handlers;
    under /v1/messages they speak Anthropic, elsewhere still OpenAI."""
    server = await start_server(max_body_bytes=2000)
    cases = [
        (client.post(server.url + URL + "/count_tokens", json=body()), 404, "not_found_error"),
        (client.get(server.url + URL), 405, "invalid_request_error"),
        (client.post(server.url + URL, json=body("x" * 5000)), 413, "request_too_large"),
        (
            client.post(server.url + URL, content=b"{}", headers={"content-type": "text/plain"}),
            415,
            "invalid_request_error",
        ),
        (
            client.post(server.url + URL, content=b"{nope", headers={"content-type": "application/json"}),
            400,
            "invalid_request_error",
        ),
    ]
    for request, status, kind in cases:
        resp = await request
        assert resp.status_code == status
        assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == kind
    too_large = await sdk_error(server, messages=[{"role": "user", "content": "x" * 5000}])
    assert type(too_large) is anthropic.ContentTooLargeError and too_large.type == "request_too_large"
    openai_side = await client.get(server.url + "/v1/chat/completions")
    assert set(openai_side.json()["error"]) == {"message", "type", "param", "code"}


async def test_limits_of_the_engine_speak_anthropic_with_retry_after(start_server):
    """The engine's 429 (no slot, no queue) and 503 (shutting down) reach an
    Anthropic client as RateLimitError and ServiceUnavailableError, with
    the Retry-After the SDK would wait for."""
    server = await start_server(max_active=1, max_queue=0)
    async with sdk(server).messages.stream(
        model=MODEL, max_tokens=20_000, messages=MESSAGES, extra_body=LONG
    ):
        busy = await sdk_error(server)
    assert type(busy) is anthropic.RateLimitError and busy.type == "rate_limit_error"
    assert busy.response.headers["retry-after"] == "1"
    server.engine.accepting = False
    closing = await sdk_error(server)
    assert type(closing) is anthropic.ServiceUnavailableError and closing.type == "overloaded_error"
    assert "shutting down" in closing.api_message


async def test_a_wrong_key_is_an_authentication_error_and_x_api_key_is_read(start_server):
    """With keys configured (``auth.py``), the SDK's ``x-api-key`` opens
    the door, and a wrong one gets a 401 in Anthropic's shape."""
    server = await start_server(api_keys=("sk-right",))
    wrong = await sdk_error(server)  # sdk() sends api_key="unused"
    assert type(wrong) is anthropic.AuthenticationError and wrong.type == "authentication_error"
    right = anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-right", max_retries=0)
    message = await right.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert message.usage.output_tokens == 3
