"""API keys on every protocol (``refimpl/auth.py``, lesson 14).

A real server with ``Config.api_keys`` set, and the clients people use: the
openai and anthropic SDKs and httpx over HTTP, trio-websocket (the header,
the subprotocol token and ``?api_key=``), the stock grpcio client, and our
own ``refimpl chat`` clients with ``REFIMPL_API_KEY`` in the environment.
"""

from __future__ import annotations

import anthropic
import grpc
import httpx
import openai
import pytest
import trio
from conftest import chat_body
from playwright.sync_api import expect
from test_demo_page import ENDED, Demo, run_page
from test_grpc import request, status_of, stub_for, target
from test_websocket import chat, close_code, ws_url
from trio_websocket import open_websocket_url

from refimpl import client as sse_client
from refimpl import grpc_client, ws_client
from refimpl.auth import Keys, bearer, websocket_key

KEYS = ("sk-first", "sk-second")


@pytest.fixture
async def keyed(start_server):
    return await start_server(api_keys=KEYS)


def test_every_key_is_accepted_and_nothing_else():
    keys = Keys(KEYS)
    assert keys.allows("sk-first") and keys.allows("sk-second")
    assert not keys.allows("sk-firs") and not keys.allows("sk-first!") and not keys.allows(None)
    assert not keys.allows("") and Keys(()).allows(None)  # no keys configured: all welcome


def test_where_a_key_may_be():
    assert bearer("Bearer sk-1") == bearer("bearer  sk-1 ") == "sk-1"
    assert bearer("Basic dXNlcg==") is None and bearer(None) is None and bearer("Bearer") is None
    offered = ["refimpl.chat", "openai-insecure-api-key.sk-1"]
    assert websocket_key({}, b"", offered) == "sk-1"
    assert websocket_key({}, b"api_key=sk-2&x=1", []) == "sk-2"
    assert websocket_key({"authorization": "Bearer sk-3"}, b"api_key=sk-2", offered) == "sk-3"
    assert websocket_key({}, b"", ["refimpl.chat"]) is None


# -- HTTP -------------------------------------------------------------------------
async def test_http_without_a_key_is_401_in_the_openai_shape(keyed, client):
    resp = await client.post(f"{keyed.url}/v1/chat/completions", json=chat_body())
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == 'Bearer realm="refimpl"'
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_api_key",
        None,
    )
    assert not keyed.engine.active

    wrong = await client.post(
        f"{keyed.url}/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sk-nope"}
    )
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert "sk-nope" not in wrong.text  # a key is never echoed


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
async def test_http_with_a_key_streams(keyed, client, header):
    value = "Bearer sk-second" if header == "Authorization" else "sk-second"
    resp = await client.post(
        f"{keyed.url}/v1/chat/completions", json=chat_body(stream=True), headers={header: value}
    )
    assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")


async def test_the_openai_sdk_sends_its_key_and_raises_authentication_error(keyed):
    good = openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key="sk-first", max_retries=0)
    stream = await good.chat.completions.create(
        model="refimpl-sim", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    assert [c async for c in stream][-1].choices[0].finish_reason == "stop"
    bad = openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        await bad.chat.completions.create(model="refimpl-sim", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.code == "invalid_api_key"


async def test_public_paths_need_no_key_and_the_rest_do(keyed, client):
    for path in ("/", "/metrics", "/static/chat.js"):
        assert (await client.get(keyed.url + path)).status_code == 200, path
    for path in ("/v1/models", "/v1/debug/generations/chatcmpl-x", "/v1/chat/completions/x/events"):
        assert (await client.get(keyed.url + path)).status_code == 401, path
    models = await client.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer sk-first"})
    assert models.status_code == 200


async def test_public_paths_are_configurable(start_server, client):
    server = await start_server(api_keys=KEYS, public_paths=("/v1/models",))
    assert (await client.get(f"{server.url}/v1/models")).status_code == 200
    assert (await client.get(f"{server.url}/metrics")).status_code == 401
    assert (await client.get(f"{server.url}/static/chat.js")).status_code == 401


async def test_no_keys_configured_means_no_key_needed(server, client):
    resp = await client.post(f"{server.url}/v1/chat/completions", json=chat_body())
    assert resp.status_code == 200


# -- WebSocket ----------------------------------------------------------------------
async def test_websocket_without_a_key_is_closed_1008_with_a_reason(keyed):
    async with open_websocket_url(ws_url(keyed)) as ws:
        assert await close_code(ws) == 1008
        assert ws.closed.reason.startswith("invalid_api_key: no API key")
    async with open_websocket_url(ws_url(keyed) + "?api_key=sk-wrong") as ws:
        assert await close_code(ws) == 1008
        assert ws.closed.reason == "invalid_api_key: incorrect API key provided"
    assert not keyed.engine.active


@pytest.mark.parametrize("how", ["header", "subprotocol", "query"])
async def test_websocket_with_a_key_chats(keyed, how):
    url, kwargs = ws_url(keyed), {}
    if how == "header":
        kwargs["extra_headers"] = [("Authorization", "Bearer sk-first")]
    elif how == "subprotocol":  # what a browser can do: OpenAI's form
        kwargs["subprotocols"] = ["refimpl.chat", "openai-insecure-api-key.sk-first"]
    else:
        url += "?api_key=sk-first"
    async with open_websocket_url(url, **kwargs) as ws:
        if how == "subprotocol":  # the server picks the real one, never the key
            assert ws.subprotocol == "refimpl.chat"
        await ws.send_message(chat())
        with trio.fail_after(10):
            while '"done"' not in (message := await ws.get_message()):
                pass
        assert '"finish_reason":"stop"' in message.replace(" ", "")


# -- gRPC ---------------------------------------------------------------------------
async def test_grpc_without_a_good_key_is_unauthenticated(keyed):
    def call(metadata) -> grpc.RpcError | list:
        with grpc.insecure_channel(target(keyed)) as channel:
            try:
                return list(stub_for(channel).StreamChat(request(), metadata=metadata))
            except grpc.RpcError as err:
                return err

    for metadata in ((), (("authorization", "Bearer sk-nope"),)):
        err = await trio.to_thread.run_sync(call, metadata)
        assert status_of(err)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key")
    chunks = await trio.to_thread.run_sync(call, (("authorization", "Bearer sk-second"),))
    assert chunks[-1].finish_reason == "stop"
    assert not keyed.engine.active


# -- our own clients send REFIMPL_API_KEY ---------------------------------------------
async def test_our_clients_send_refimpl_api_key(keyed, monkeypatch):
    body = chat_body(max_tokens=3)
    monkeypatch.setenv("REFIMPL_API_KEY", "sk-second")
    async with httpx.AsyncClient() as http:
        events = [e async for e in sse_client.stream_chat(http, keyed.url, body)]
    assert events[-1].finish_reason == "length"
    async with ws_client.connect(keyed.url) as ws:
        assert [e async for e in ws.chat(body["messages"], max_tokens=3)][-1].type == "done"
    async with grpc_client.stream_chat(keyed.url, body) as chunks:
        assert [c async for c in chunks][-1].finish_reason == "length"

    monkeypatch.setenv("REFIMPL_API_KEY", "sk-wrong")
    with pytest.raises(sse_client.StreamError) as err:
        async with httpx.AsyncClient() as http:
            [e async for e in sse_client.stream_chat(http, keyed.url, body)]
    assert err.value.error["code"] == "invalid_api_key"


# -- the demo page's key box, in Chromium ----------------------------------------------
async def test_the_demo_page_sends_the_typed_key_on_every_protocol(keyed):
    def drive(demo: Demo) -> dict:
        demo.knobs(tokens=5)
        demo.protocol("websocket")  # no key: the socket is closed 1008, and the page says why
        demo.page.click("#send")
        expect(demo.page.locator("#status")).to_have_text(ENDED)
        seen = {"refused": demo.text("#error-message")}
        demo.page.fill("#api-key", "sk-first")
        for protocol in ("sse", "websocket", "connect"):
            demo.protocol(protocol)
            seen[protocol] = demo.turn()  # the trace too, fetched with the key
        return seen

    seen = await run_page(keyed, drive)
    assert "1008" in seen["refused"] and "invalid_api_key" in seen["refused"]
    for protocol in ("sse", "websocket", "connect"):
        assert seen[protocol].startswith("done: 5 tokens"), protocol


async def test_the_anthropic_sdk_sends_x_api_key(keyed):
    good = anthropic.AsyncAnthropic(base_url=keyed.url, api_key="sk-first", max_retries=0)
    message = await good.messages.create(
        model="refimpl-sim", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.usage.output_tokens == 3
    bad = anthropic.AsyncAnthropic(base_url=keyed.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        await bad.messages.create(
            model="refimpl-sim", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
    assert err.value.status_code == 401
