"""CORS for a page served from another origin (``refimpl/cors.py``, lesson 14).

First the headers, with httpx (preflight, the real response, an origin not
listed, ``*``); then the browser itself: headless Chromium loads a page from
a second tiny server on another loopback port, and that page streams from
refimpl, over SSE and over Connect, with an API key -- allowed with
``--cors-origin`` for its origin, blocked without it.
"""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import trio
from conftest import chat_body
from playwright.sync_api import sync_playwright
from quart import Response
from quart_trio import QuartTrio
from test_demo_page import ARGS, CHROMIUM

from refimpl.app import serve

PAGE = "http://127.0.0.1:9"  # an origin: never contacted by the header tests
URL = "/v1/chat/completions"


def preflight_headers(origin: str, headers: str = "authorization,content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }


async def test_a_listed_origin_is_preflighted_and_may_read_the_stream(start_server, client):
    server = await start_server(cors_origins=(PAGE,), api_keys=("sk-cors",))
    asked = "authorization,content-type,x-api-key,last-event-id"
    pre = await client.options(server.url + URL, headers=preflight_headers(PAGE, asked))
    assert pre.status_code == 204  # no key needed: a browser never sends one on a preflight
    assert pre.headers["access-control-allow-origin"] == PAGE
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "authorization, *"
    assert pre.headers["vary"] == "Origin"

    headers = {"Origin": PAGE, "Authorization": "Bearer sk-cors"}
    resp = await client.post(server.url + URL, json=chat_body(stream=True), headers=headers)
    assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
    assert resp.headers["access-control-allow-origin"] == PAGE
    exposed = resp.headers["access-control-expose-headers"]
    assert "X-Request-Id" in exposed and "Location" in exposed
    assert resp.headers["vary"] == "Origin"
    refused = await client.post(server.url + URL, json=chat_body(), headers={"Origin": PAGE})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE  # readable


async def test_an_origin_not_listed_gets_no_cors_header(start_server, client):
    server = await start_server(cors_origins=(PAGE,))
    other = "http://127.0.0.1:10"
    pre = await client.options(server.url + URL, headers=preflight_headers(other))
    resp = await client.post(server.url + URL, json=chat_body(), headers={"Origin": other})
    assert pre.status_code == 403 and resp.status_code == 200
    for r in (pre, resp):
        assert not [h for h in r.headers if h.startswith("access-control-")]
        assert r.headers["vary"] == "Origin"


async def test_star_allows_any_origin_and_no_flag_means_no_cors(start_server, client):
    anyone = await start_server(cors_origins=("*",))
    resp = await client.post(anyone.url + URL, json=chat_body(), headers={"Origin": PAGE})
    assert resp.headers["access-control-allow-origin"] == "*"
    nobody = await start_server()
    resp = await client.post(nobody.url + URL, json=chat_body(), headers={"Origin": PAGE})
    assert "access-control-allow-origin" not in resp.headers and "vary" not in resp.headers


# -- in the browser ----------------------------------------------------------------
# The page's script: stream over SSE with a key, then one Connect call; it
# reports what it read, or what the browser threw (a blocked CORS request
# is a TypeError, "Failed to fetch", with no status for the script to see).
SCRIPT = """
async function sse(api) {
  const response = await fetch(api + "/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Authorization": "Bearer sk-cors" },
    body: JSON.stringify(BODY),
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  for (;;) { const { done, value } = await reader.read(); if (done) break; text += value; }
  return { status: response.status, id: response.headers.get("X-Request-Id"), text };
}
async function connect(api) {
  const json = new TextEncoder().encode(JSON.stringify({ messages: BODY.messages, maxTokens: 3 }));
  const envelope = new Uint8Array(5 + json.length);
  new DataView(envelope.buffer).setUint32(1, json.length);
  envelope.set(json, 5);
  const response = await fetch(api + "/refimpl.v1.ChatService/StreamChat", {
    method: "POST",
    headers: { "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
               "Authorization": "Bearer sk-cors" },
    body: envelope,
  });
  return { status: response.status, bytes: (await response.arrayBuffer()).byteLength };
}
window.run = async (api) => {
  const out = {};
  for (const [name, call] of [["sse", sse], ["connect", connect]]) {
    try { out[name] = await call(api); } catch (err) { out[name] = { error: String(err) }; }
  }
  return out;
};
"""


async def page_server(nursery) -> str:
    """A second server, on another port: another origin, serving one page."""
    app = QuartTrio("elsewhere")
    body = json.dumps(chat_body(stream=True, max_tokens=5))

    @app.get("/")
    async def page() -> Response:
        html = f"<!doctype html><title>elsewhere</title><script>const BODY = {body};{SCRIPT}</script>"
        return Response(html, content_type="text/html")

    return await nursery.start(partial(serve, app))


def in_chromium(page_url: str, apis: list[str]) -> list[dict]:
    """What the page read from each server (one browser, one launch)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(page_url + "/")
            return [page.evaluate("api => window.run(api)", api) for api in apis]
        finally:
            browser.close()


async def from_the_page(page_url: str, apis: list[str]) -> list[dict]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat before the test)
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(in_chromium, page_url, apis, abandon_on_cancel=True)


async def test_a_page_elsewhere_streams_with_the_flag_and_is_blocked_without(start_server, nursery):
    page_url = await page_server(nursery)
    allowed = await start_server(cors_origins=(page_url,), api_keys=("sk-cors",))
    blocked = await start_server(api_keys=("sk-cors",))
    got, refused = await from_the_page(page_url, [allowed.url, blocked.url])
    assert got["sse"]["status"] == 200 and got["sse"]["text"].endswith("data: [DONE]\n\n")
    assert got["sse"]["id"].startswith("chatcmpl-")  # an exposed header
    assert got["connect"]["status"] == 200 and got["connect"]["bytes"] > 0

    assert "Failed to fetch" in refused["sse"]["error"] and "Failed to fetch" in refused["connect"]["error"]
    assert not blocked.engine.active
