"""``POST /v1/responses`` (``refimpl/protocols/openai_responses.py``), with the openai SDK.

What the Responses dialect promises, each checked on a real server:

* the typed events in OpenAI's order, each ``event:`` name repeated as the
  JSON ``type``, with ``sequence_number`` 0, 1, 2 ... and no gap, and no
  ``[DONE]``; the SDK's ``responses.create(stream=True)`` parses them all and
  its ``responses.stream(...)`` helper accumulates them into the final
  response;
* the same generation as ``/v1/chat/completions``: for the same prompt and
  seed, the same text and the same usage, streamed or not;
* ``max_output_tokens`` cuts the answer: status ``incomplete`` and
  ``response.incomplete`` (on which the SDK's ``get_final_response`` raises);
* a failure after the 200: ``error`` then ``response.failed``, then the body
  ends; the SDK raises ``APIError`` with our error object;
* heartbeats are ``: ping`` comments that take no sequence number, one per
  ``heartbeat`` in the trace; a client that leaves cancels the generation;
* bad requests: HTTP 400 (404 for an unknown model) naming the ``param``.

Sync SDK calls run in a worker thread (the server shares this test's trio
loop); the heartbeat test runs on trio's virtual clock with httpx.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio
from test_heartbeat import blocks
from test_midstream_clients import JS, node_test

from refimpl.model import simulated_text
from refimpl.sse import SSEParser

URL = "/v1/responses"
MODEL = "refimpl-sim"
PROMPT = "Why should tokens stream?"
SEED = {"simulate": {"seed": 3}}  # the Responses API has no `seed`: ours rides in `simulate`
OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
FAIL = {"fail_after_tokens": 3, "fail_with": "overloaded"}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def responses_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": PROMPT, "stream": True, **extra}


async def read_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[httpx.Response, bytes, list]:
    """POST a streamed request: the response, the raw body, the parsed events."""
    raw, parser = b"", SSEParser()
    async with client.stream("POST", url + URL, json=body) as resp:
        async for chunk in resp.aiter_raw():
            raw += chunk
    return resp, raw, parser.feed(raw) + parser.close()


def datas(events: list) -> list[dict]:
    """Each event's JSON, after checking that its name and its type agree."""
    out = [json.loads(e.data) for e in events]
    assert [e.type for e in events] == [d["type"] for d in out]
    return out


def deltas(data: list[dict]) -> list[str]:
    return [d["delta"] for d in data if d["type"] == "response.output_text.delta"]


# -- the events, on the wire and through the SDK ------------------------------------
async def test_the_wire_typed_events_numbered_without_gap(server, client):
    resp, raw, events = await read_stream(client, server.url, responses_body())
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    data = datas(events)
    assert [d["type"] for d in data] == OPENING + ["response.output_text.delta"] * 24 + CLOSING + [
        "response.completed"
    ]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert b"[DONE]" not in raw
    # One item, one part, and every delta points at them.
    item_id = data[2]["item"]["id"]
    for d in data:
        if d["type"] == "response.output_text.delta":
            assert (d["item_id"], d["output_index"], d["content_index"], d["logprobs"]) == (item_id, 0, 0, [])
    text = "".join(deltas(data))
    assert text == "".join(simulated_text(PROMPT, 0)[:24])
    assert data[-4]["text"] == data[-3]["part"]["text"] == text
    completed = data[-1]["response"]
    assert completed["id"] == resp.headers["x-request-id"] == data[0]["response"]["id"]
    assert completed["status"] == "completed" and completed["output"] == [data[-2]["item"]]
    assert completed["usage"]["output_tokens"] == 24
    assert (await server.trace(completed["id"]))["events"][-1]["name"] == "done"


def sdk_create_stream(url: str) -> list:
    return list(sdk(url).responses.create(model=MODEL, input=PROMPT, stream=True, extra_body=SEED))


async def test_sdk_create_stream_parses_every_event(server):
    events = await trio.to_thread.run_sync(sdk_create_stream, server.url)
    types = [e.type for e in events]
    assert types[:4] == OPENING and types[-4:] == [*CLOSING, "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == 24


def sdk_stream_helper(url: str) -> tuple[list[str], Any]:
    with sdk(url).responses.stream(model=MODEL, input=PROMPT, extra_body=SEED) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        return snapshots, stream.get_final_response()


async def test_sdk_stream_helper_accumulates_the_final_response(server):
    snapshots, final = await trio.to_thread.run_sync(sdk_stream_helper, server.url)
    assert len(snapshots) == 24 and snapshots[-1] == final.output_text
    assert final.status == "completed" and final.output[0].status == "completed"
    assert final.usage.total_tokens == final.usage.input_tokens + 24


# -- the same generation as Chat Completions ----------------------------------------
def both_dialects(url: str) -> tuple:
    client = sdk(url)
    system, seed = "Be brief.", 3
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": PROMPT}],
        seed=seed,
    )
    # The same conversation as Responses input items, with a text part.
    items = [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]
    kwargs = {
        "model": MODEL,
        "instructions": system,
        "input": items,
        "extra_body": {"simulate": {"seed": seed}},
    }
    full = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        streamed = stream.get_final_response()
    return chat, full, streamed


async def test_same_text_and_usage_as_chat_completions(server):
    chat, full, streamed = await trio.to_thread.run_sync(both_dialects, server.url)
    assert full.object == "response" and full.status == "completed"
    assert full.output_text == streamed.output_text == chat.choices[0].message.content
    for usage in (full.usage, streamed.usage):
        assert usage.input_tokens == chat.usage.prompt_tokens
        assert usage.output_tokens == chat.usage.completion_tokens
        assert usage.total_tokens == chat.usage.total_tokens
    assert full.instructions == "Be brief."


# -- max_output_tokens ----------------------------------------------------------------
def sdk_incomplete(url: str) -> tuple:
    client = sdk(url)
    full = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=16)
    events = list(client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=16, stream=True))
    helper = client.responses.stream(model=MODEL, input=PROMPT, max_output_tokens=16)
    with pytest.raises(RuntimeError) as info, helper as stream:
        stream.get_final_response()
    return full, events, info.value


async def test_max_output_tokens_makes_an_incomplete_response(server):
    """24 tokens asked of the model, 16 allowed: the answer stops at 16 and
    says why.  The SDK's stream helper then has no ``response.completed``
    and raises: ``get_final_response`` is for complete answers only."""
    full, events, helper_error = await trio.to_thread.run_sync(sdk_incomplete, server.url)
    assert full.status == "incomplete" and full.incomplete_details.reason == "max_output_tokens"
    assert full.usage.output_tokens == 16 and full.output[0].status == "incomplete"
    last = events[-1]
    assert last.type == "response.incomplete" and "response.completed" not in [e.type for e in events]
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == full.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.completed" in str(helper_error)


# -- a failure after the 200 ----------------------------------------------------------
async def test_mid_stream_failure_on_the_wire(server, client):
    resp, _, events = await read_stream(client, server.url, responses_body(simulate=FAIL))
    data = datas(events)
    assert [d["type"] for d in data[4:]] == ["response.output_text.delta"] * 3 + ["error", "response.failed"]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    error, failed = data[-2], data[-1]["response"]
    assert (error["code"], error["param"]) == ("overloaded", None)
    assert error["error"] == {
        "message": error["message"],
        "type": "server_error",
        "param": None,
        "code": "overloaded",
    }
    assert failed["status"] == "failed" and failed["error"] == error["error"]
    assert failed["output"][0]["content"][0]["text"] == "".join(deltas(data))
    assert failed["usage"]["output_tokens"] == 3
    trace = await server.trace(resp.headers["x-request-id"])
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", "overloaded")


def sdk_failure(url: str) -> tuple[list, openai.APIError, openai.APIError]:
    client = sdk(url)
    seen = []
    with pytest.raises(openai.APIError) as created:
        for event in client.responses.create(
            model=MODEL, input=PROMPT, stream=True, extra_body={"simulate": FAIL}
        ):
            seen.append(event)
    manager = client.responses.stream(model=MODEL, input=PROMPT, extra_body={"simulate": FAIL})
    with pytest.raises(openai.APIError) as helper, manager as stream:
        stream.get_final_response()
    return seen, created.value, helper.value


async def test_sdk_raises_at_the_error_event(server):
    """The SDK hands over everything before the ``error`` event, then raises
    ``APIError`` with our error object; the stream helper raises the same."""
    seen, created, helper = await trio.to_thread.run_sync(sdk_failure, server.url)
    assert [e.type for e in seen][4:] == ["response.output_text.delta"] * 3
    assert "".join(e.delta for e in seen[4:]) == "".join(simulated_text(PROMPT, 0)[:3])
    for err in (created, helper):
        assert (
            err.body["code"] == "overloaded"
            and err.message == "The model failed while generating (overloaded)."
        )


# -- heartbeats and disconnects -------------------------------------------------------
async def test_heartbeats_are_comments_without_sequence_numbers(start_server, client, autojump_clock):
    """Heartbeat 1 s, a token every 2.5 s (virtual time): pings in each gap,
    as comments between whole events; the events stay numbered without gap,
    and each ping on the wire is one ``heartbeat`` in the trace."""
    server = await start_server(heartbeat=1.0)
    body = responses_body(simulate={"ttft_ms": 0, "itl_ms": 2500, "tokens": 4})
    resp, raw, events = await read_stream(client, server.url, body)
    pings = [b for b in blocks(raw) if b.startswith(b":")]
    assert pings == [b": ping"] * 6
    data = datas(events)
    assert [d["sequence_number"] for d in data] == list(range(len(data))) and len(deltas(data)) == 4
    trace = await server.trace(resp.headers["x-request-id"])
    assert [e["name"] for e in trace["events"]].count("heartbeat") == len(pings)


async def test_a_client_that_leaves_cancels_the_generation(server, client):
    body = responses_body(simulate={"ttft_ms": 0, "itl_ms": 60_000})
    async with client.stream("POST", server.url + URL, json=body) as resp:
        gen = server.engine.get(resp.headers["x-request-id"])
        parser = SSEParser()
        async for raw in resp.aiter_raw():
            if any(e.type == "response.output_text.delta" for e in parser.feed(raw)):
                break  # one token read; leaving the block closes the connection
    with trio.fail_after(10):
        await gen.ended.wait()
    trace = await server.trace(gen.id)
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("cancelled", "client_disconnect")
    assert trace["completion_tokens"] == 1 and not server.engine.active


async def test_shutdown_mid_stream_ends_with_error_and_failed(server, client):
    """The drain ran out (``patterns/shutdown.py`` cancels with "shutdown"):
    the client reads ``server_shutdown``, then ``response.failed``."""
    body = responses_body(simulate={"ttft_ms": 0, "itl_ms": 60_000})
    parser, events = SSEParser(), []
    async with client.stream("POST", server.url + URL, json=body) as resp:
        async for raw in resp.aiter_raw():
            events += parser.feed(raw)
            if any(e.type == "response.output_text.delta" for e in events):
                server.engine.cancel_all("shutdown")
    data = datas(events)
    assert [d["type"] for d in data[-2:]] == ["error", "response.failed"]
    assert data[-2]["code"] == data[-1]["response"]["error"]["code"] == "server_shutdown"
    assert [d["sequence_number"] for d in data] == list(range(len(data)))


# -- errors before the stream ---------------------------------------------------------
BAD = [
    ({"input": PROMPT}, "model", 400),
    ({"model": "gpt-unknown", "input": PROMPT}, "model", 404),
    ({"model": MODEL}, "input", 400),
    ({"model": MODEL, "input": []}, "input", 400),
    ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role", 400),
    ({"model": MODEL, "input": [{"type": "function_call_output", "output": "1"}]}, "input[0].type", 400),
    (
        {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0]",
        400,
    ),
    ({"model": MODEL, "input": PROMPT, "instructions": 7}, "instructions", 400),
    ({"model": MODEL, "input": PROMPT, "max_output_tokens": 15}, "max_output_tokens", 400),
    ({"model": MODEL, "input": PROMPT, "stream": "yes"}, "stream", 400),
    ({"model": MODEL, "input": PROMPT, "previous_response_id": "resp_1"}, "previous_response_id", 400),
    ({"model": MODEL, "input": PROMPT, "background": True}, "background", 400),
    ({"model": MODEL, "input": PROMPT, "simulate": {"nope": 1}}, "simulate.nope", 400),
    ({"model": MODEL, "input": PROMPT, "backpressure": "drop"}, "backpressure", 400),
]


@pytest.mark.parametrize(("body", "param", "status"), BAD, ids=[p for _, p, _ in BAD])
async def test_bad_requests_name_the_param(server, client, body, param, status):
    resp = await client.post(server.url + URL, json=body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert not server.engine.active  # refused before any generation started


async def test_server_limits_and_keys_apply_here_too(start_server, client):
    """``limits.py`` and ``auth.py`` guard every route; a refusal names this
    dialect's param (``max_output_tokens``, not ``max_tokens``)."""
    server = await start_server(api_keys=("sesame",), max_tokens_limit=100)
    body = {"model": MODEL, "input": PROMPT, "max_output_tokens": 101}
    assert (await client.post(server.url + URL, json=body)).status_code == 401
    resp = await client.post(server.url + URL, json=body, headers={"Authorization": "Bearer sesame"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "max_output_tokens"


def sdk_bad_request(url: str) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(url).responses.create(model=MODEL, input=PROMPT, max_output_tokens=8)
    return info.value


async def test_sdk_sees_a_typed_error(server):
    err = await trio.to_thread.run_sync(sdk_bad_request, server.url)
    assert err.param == "max_output_tokens" and err.code == "integer_below_min_value"


# -- the Vercel AI SDK's default OpenAI provider (Node) -------------------------------
async def test_ai_sdk_default_openai_provider(server):
    """``streamText({model: openai("refimpl-sim")})`` from ``ai`` +
    ``@ai-sdk/openai``: the provider's default model calls ``/v1/responses``
    (``tests/js/responses_ai_sdk.test.mjs``; packages from
    ``tests/js/package-lock.json``)."""
    await node_test(server.url, [JS / "responses_ai_sdk.test.mjs"])
