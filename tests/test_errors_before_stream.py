"""Every failure before the stream starts: right status, OpenAI error shape.

One table, one test: the request, the status we expect, and the ``code`` /
``param`` the body must name.  Never a traceback, never a 500 for the
caller's mistake (STYLE §11).
"""

from __future__ import annotations

import json

import pytest
from conftest import chat_body

URL = "/v1/chat/completions"
OK = chat_body()

CASES = [
    # name, method, path, content, headers, status, code, param
    ("bad json", "POST", URL, b"{nope", None, 400, "invalid_json", None),
    ("not an object", "POST", URL, b"[1,2]", None, 400, "invalid_json", None),
    (
        "missing model",
        "POST",
        URL,
        {"messages": OK["messages"]},
        None,
        400,
        "missing_required_parameter",
        "model",
    ),
    ("unknown model", "POST", URL, {**OK, "model": "gpt-4"}, None, 404, "model_not_found", "model"),
    ("no messages", "POST", URL, {**OK, "messages": []}, None, 400, "invalid_value", "messages"),
    (
        "bad role",
        "POST",
        URL,
        {**OK, "messages": [{"role": "robot", "content": "x"}]},
        None,
        400,
        "invalid_value",
        "messages[0]",
    ),
    (
        "bad content",
        "POST",
        URL,
        {**OK, "messages": [{"role": "user", "content": 5}]},
        None,
        400,
        "invalid_value",
        "messages[0].content",
    ),
    ("stream not bool", "POST", URL, {**OK, "stream": "yes"}, None, 400, "invalid_value", "stream"),
    (
        "stream_options without stream",
        "POST",
        URL,
        {**OK, "stream_options": {"include_usage": True}},
        None,
        400,
        "invalid_value",
        "stream_options",
    ),
    ("n=2", "POST", URL, {**OK, "n": 2}, None, 400, "invalid_value", "n"),
    ("temperature", "POST", URL, {**OK, "temperature": 3}, None, 400, "invalid_value", "temperature"),
    ("max_tokens 0", "POST", URL, {**OK, "max_tokens": 0}, None, 400, "invalid_value", "max_tokens"),
    (
        "stop too many",
        "POST",
        URL,
        {**OK, "stop": ["a", "b", "c", "d", "e"]},
        None,
        400,
        "invalid_value",
        "stop",
    ),
    (
        "unknown knob",
        "POST",
        URL,
        {**OK, "simulate": {"speed": 1}},
        None,
        400,
        "unknown_parameter",
        "simulate.speed",
    ),
    (
        "negative knob",
        "POST",
        URL,
        {**OK, "simulate": {"itl_ms": -1}},
        None,
        400,
        "invalid_value",
        "simulate.itl_ms",
    ),
    (
        "NaN",
        "POST",
        URL,
        b'{"model":"refimpl-sim","messages":[],"temperature":NaN}',
        None,
        400,
        "invalid_json",
        None,
    ),
    (
        "number overflows",
        "POST",
        URL,
        b'{"model":"refimpl-sim","messages":[{"role":"user","content":"x"}],"simulate":{"tokens":1e400}}',
        None,
        400,
        "invalid_json",
        None,
    ),
    ("deep nesting", "POST", URL, b"[" * 100_000 + b"]" * 100_000, None, 400, "invalid_json", None),
    (
        "lone surrogate echoed",
        "POST",
        URL,
        b'{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}',
        None,
        404,
        "model_not_found",
        "model",
    ),
    (
        "role not a string",
        "POST",
        URL,
        {**OK, "messages": [{"role": ["user"], "content": "x"}]},
        None,
        400,
        "invalid_value",
        "messages[0]",
    ),
    (
        "wrong content type",
        "POST",
        URL,
        b"model=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
        None,
    ),
    (
        "body too large",
        "POST",
        URL,
        b'{"x":"' + b"a" * (2 << 20) + b'"}',
        None,
        413,
        "request_entity_too_large",
        None,
    ),
    ("wrong method", "GET", URL, None, None, 405, "method_not_allowed", None),
    ("unknown path", "GET", "/v1/nope", None, None, 404, "not_found", None),
    ("unknown generation", "GET", "/v1/debug/generations/chatcmpl-x", None, None, 404, "not_found", None),
]


@pytest.mark.parametrize(
    "method,path,content,headers,status,code,param",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_error_shape(server, client, method, path, content, headers, status, code, param):
    if isinstance(content, dict):
        content = json.dumps(content).encode()
    headers = headers or ({"Content-Type": "application/json"} if content is not None else {})
    resp = await client.request(method, server.url + path, content=content, headers=headers)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"] and "Traceback" not in error["message"]
    assert not server.engine.active  # nothing was started


async def test_too_many_generations_is_429(start_server, client):
    server = await start_server(max_active=1, max_queue=0)
    body = chat_body(stream=True, simulate={"ttft_ms": 60_000})
    async with client.stream("POST", server.url + URL, json=body) as first:
        assert first.status_code == 200
        resp = await client.post(server.url + URL, json=chat_body())
        assert resp.status_code == 429
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert resp.json()["error"]["code"] == "too_many_requests"
        # When to try again: the SDKs wait this long before their retry.
        assert (resp.headers["retry-after"], resp.headers["retry-after-ms"]) == ("1", "1000")
