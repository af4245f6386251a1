"""The status a failure gets when it can still get one, and what the SDK does with it.

A non-streamed request that fails is answered with the status of
``patterns/errors.py``'s failure table, and that status decides what the
openai SDK does next: it retries 408/409/429/5xx twice by default (waiting
for ``retry-after-ms`` / ``Retry-After`` when sent) and never retries other
4xx.  Each generation the server started is counted in
``refimpl_generations_total``, so the retries are counted on the server, not
guessed.  Lesson 07 shows this table.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import trio
from conftest import chat_body
from test_lifecycle import metric

from refimpl.patterns.errors import FAILURES

URL = "/v1/chat/completions"
# (code, status, the SDK exception, generations one call makes with the
# SDK's default max_retries=2)
TABLE = [
    ("overloaded", 503, openai.InternalServerError, 3),
    ("timeout", 504, openai.InternalServerError, 3),
    ("internal_error", 500, openai.InternalServerError, 3),
    ("model_error", 500, openai.InternalServerError, 3),
    ("content_filter", 400, openai.BadRequestError, 1),
]


def test_table_covers_every_failure_the_model_can_report():
    # The server's doing, never the model's: shutdown, a slow client, a
    # resumable stream's log or store (lesson 11), a cancel by a client.
    theirs = {"server_shutdown", "slow_consumer", "resume_log_full", "store_unavailable", "generation_lost"}
    # A real upstream's (upstream.py): tested against one in test_upstream.py.
    upstream = {code for code in FAILURES if code.startswith("upstream_")}
    clients = {"client_cancel", "client_disconnect"}
    assert {code for code, *_ in TABLE} == set(FAILURES) - theirs - upstream - clients
    assert {code: status for code, status, *_ in TABLE} == {c: FAILURES[c][0] for c, *_ in TABLE}


@pytest.mark.parametrize(("code", "status"), [(c, s) for c, s, *_ in TABLE])
async def test_status_body_and_retry_after(start_server, client, code, status):
    server = await start_server(retry_after=0.25)
    body = chat_body(simulate={"fail_after_tokens": 2, "fail_with": code})
    resp = await client.post(server.url + URL, json=body)
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code == "overloaded":  # come back later: when, in both units
        assert (resp.headers["retry-after"], resp.headers["retry-after-ms"]) == ("1", "250")
    else:
        assert "retry-after" not in resp.headers and "retry-after-ms" not in resp.headers
    trace = await server.trace(resp.headers["x-request-id"])
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("error", code)


async def sdk_call(url: str, code: str) -> openai.APIStatusError:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")  # default max_retries=2
    try:
        await client.chat.completions.create(
            model="refimpl-sim",
            messages=[{"role": "user", "content": "Hello"}],
            extra_body={"simulate": {"fail_after_tokens": 2, "fail_with": code}},
        )
    except openai.APIStatusError as err:
        return err
    finally:
        await client.close()
    raise AssertionError("the call should have failed")


async def test_what_the_openai_sdk_does_with_each_status(start_server, client):
    """One server per code, all calls at once (the SDK's own back-off
    between retries is real time); each server counts its generations."""
    servers = {code: await start_server(retry_after=0.05) for code, *_ in TABLE}

    def run_all() -> dict[str, openai.APIStatusError]:
        async def main():
            calls = [sdk_call(servers[code].url, code) for code, *_ in TABLE]
            return dict(zip([code for code, *_ in TABLE], await asyncio.gather(*calls), strict=True))

        return asyncio.run(main())

    errors = await trio.to_thread.run_sync(run_all)
    for code, status, exception, generations in TABLE:
        err = errors[code]
        assert type(err) is exception and err.status_code == status, code
        assert err.body["code"] == code
        text = (await client.get(servers[code].url + "/metrics")).text
        assert metric(text, "refimpl_generations_total") == generations, code
        assert metric(text, f'refimpl_errors_total{{reason="{code}"}}') == generations, code
        assert metric(text, "refimpl_active_generations") == 0
