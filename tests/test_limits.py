"""Limits, each with its own clear error (``refimpl/limits.py``, lesson 14).

Every limit is checked in ``Engine.start``, so one protocol per limit would
do; the per-client stream limit is shown on SSE, WebSocket and gRPC because
its slot must free however a generation ends.  The body size is Quart's
(413, with a Content-Length and with a chunked body); the WebSocket message
size (close 1009) is proven by ``test_websocket.py::test_oversized_message_closes_1009``.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
import trio
from conftest import chat_body
from test_grpc import request, status_of, stub_for, target
from test_websocket import SLOW, chat, open_chat, receive

URL = "/v1/chat/completions"
LONG = {"ttft_ms": 0, "itl_ms": 60_000, "tokens": 10}  # one token, then a minute of silence


def error_of(resp: httpx.Response) -> tuple[int, str, str | None, str]:
    error = resp.json()["error"]
    return resp.status_code, error["code"], error["param"], error["type"]


# -- one request -------------------------------------------------------------------
async def test_a_body_too_large_is_413_with_or_without_content_length(start_server, client):
    server = await start_server(max_body_bytes=1000)
    big = b'{"model": "refimpl-sim", "messages": [{"role": "user", "content": "' + b"x" * 1000 + b'"}]}'
    headers = {"Content-Type": "application/json"}
    sized = await client.post(server.url + URL, content=big, headers=headers)

    async def chunks():  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    chunked = await client.post(server.url + URL, content=chunks(), headers=headers)
    assert "content-length" not in chunked.request.headers
    for resp in (sized, chunked):
        assert error_of(resp) == (413, "request_entity_too_large", None, "invalid_request_error")
        assert "larger than 1000 bytes" in resp.json()["error"]["message"]
    assert not server.engine.active


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (chat_body(messages=[{"role": "user", "content": "hi"}] * 4), "messages", "too_many_messages"),
        (chat_body("x" * 101), "messages", "prompt_too_long"),
        (chat_body(max_tokens=51), "max_tokens", "max_tokens_too_large"),
        (chat_body(max_completion_tokens=51), "max_tokens", "max_tokens_too_large"),
    ],
    ids=["messages", "prompt-chars", "max_tokens", "max_completion_tokens"],
)
async def test_a_request_past_a_limit_is_400_naming_the_param(start_server, client, body, param, code):
    server = await start_server(max_messages=3, max_prompt_chars=100, max_tokens_limit=50)
    for stream in (False, True):
        resp = await client.post(server.url + URL, json={**body, "stream": stream})
        assert error_of(resp) == (400, code, param, "invalid_request_error")
    if "max_completion_tokens" not in body:  # the same check on the WebSocket (no such field)
        async with open_chat(server) as ws:
            await ws.send_message(chat(**{k: v for k, v in body.items() if k != "model"}))
            assert (await receive(ws))["error"]["code"] == code
    assert not server.engine.active


async def test_at_the_limits_is_fine_and_the_simulated_length_is_not_an_ask(start_server, client):
    server = await start_server(max_messages=3, max_prompt_chars=100, max_tokens_limit=50)
    body = chat_body(messages=[{"role": "user", "content": "x" * 50}] * 2, max_tokens=50)
    assert (await client.post(server.url + URL, json=body)).status_code == 200
    # simulate.tokens is how long the model talks, not a request: not refused.
    long = await client.post(server.url + URL, json=chat_body(simulate={"tokens": 60}))
    assert long.json()["usage"]["completion_tokens"] == 60


# -- one client address --------------------------------------------------------------
async def hold_a_stream(client: httpx.AsyncClient, url: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Open a long stream; its id to the starter; hold it until cancelled."""
    body = chat_body(stream=True, simulate=LONG)
    async with client.stream("POST", url + URL, json=body) as resp:
        assert resp.status_code == 200
        task_status.started(resp.headers["x-request-id"])
        await trio.sleep_forever()


async def test_streams_per_address_are_limited_and_freed_when_one_ends(start_server, client):
    server = await start_server(max_streams_per_client=2)
    async with trio.open_nursery() as holders:
        ids = [await holders.start(hold_a_stream, client, server.url) for _ in range(2)]
        refused = await client.post(server.url + URL, json=chat_body(stream=True))
        assert error_of(refused) == (429, "too_many_streams", None, "rate_limit_error")
        assert refused.headers["retry-after"] == "1"

        # Another address is not affected (127.0.0.2 is loopback too).
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=other) as elsewhere:
            assert (await elsewhere.post(server.url + URL, json=chat_body())).status_code == 200

        # The holders hang up (a disconnect): their slots free when their generations end.
        holders.cancel_scope.cancel()
    for gen_id in ids:
        with trio.fail_after(10):
            await server.engine.get(gen_id).ended.wait()
    assert (await client.post(server.url + URL, json=chat_body())).status_code == 200


async def test_no_cap_on_streams_per_address_when_it_is_0(start_server, client):
    """``--max-streams-per-client 0``: no cap (the bench's load, all from
    127.0.0.1; a proxy in front that does its own limiting)."""
    server = await start_server(max_streams_per_client=0)
    async with trio.open_nursery() as holders:
        for _ in range(3):
            await holders.start(hold_a_stream, client, server.url)
        assert (await client.post(server.url + URL, json=chat_body())).status_code == 200
        holders.cancel_scope.cancel()


async def test_a_websocket_cancel_frees_the_slot(start_server, client):
    server = await start_server(max_streams_per_client=1)
    async with open_chat(server) as ws:
        await ws.send_message(chat(simulate=SLOW))
        await receive(ws)  # the first token: the slot is taken
        refused = await client.post(server.url + URL, json=chat_body())
        assert error_of(refused)[:2] == (429, "too_many_streams")
        await ws.send_message('{"type":"cancel"}')
        assert (await receive(ws))["type"] == "cancelled"
        await ws.send_message(chat())  # the freed slot, on the same socket
        while (message := await receive(ws))["type"] == "token":
            pass
        assert message["type"] == "done"


async def test_grpc_counts_against_the_same_address(start_server, client):
    server = await start_server(max_streams_per_client=1)

    def call() -> grpc.RpcError:
        with grpc.insecure_channel(target(server)) as channel:
            stub = stub_for(channel)
            first = stub.StreamChat(request(simulate={"itl_ms": 60_000, "tokens": 10}), timeout=10)
            next(first)
            try:
                list(stub.StreamChat(request()))
            except grpc.RpcError as err:
                return err
            finally:
                first.cancel()  # a cancel (RST_STREAM) ends the first, freeing its slot
        raise AssertionError("admitted past the per-client limit")

    err = await trio.to_thread.run_sync(call)
    assert status_of(err)[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_streams")
    with trio.fail_after(10):
        for gen in list(server.engine.active.values()):
            await gen.ended.wait()
    assert (await client.post(server.url + URL, json=chat_body())).status_code == 200


async def test_the_other_dialects_pass_the_same_limits(start_server, client):
    """/v1/messages and /v1/responses start their generations with
    Engine.start like every route, so they get the limits with no code."""
    server = await start_server(max_tokens_limit=50)
    anthropic = await client.post(
        f"{server.url}/v1/messages",
        json={"model": "refimpl-sim", "max_tokens": 51, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert anthropic.status_code == 400 and "max_tokens is too large" in anthropic.text
    responses = await client.post(
        f"{server.url}/v1/responses", json={"model": "refimpl-sim", "input": "Hi", "max_output_tokens": 51}
    )
    assert responses.status_code == 400 and "max_tokens is too large" in responses.text
