"""The check of exercise 04: read three pieces of a long answer, then leave.

Your ``first_pieces`` runs in a worker thread (the openai SDK's ``OpenAI``
client is synchronous) against a real server in this process, through an
``openai.OpenAI`` client that the check builds, as the caller of your
function would, and closes at the end.  On a real clock, not trio's
virtual one: while the thread waits on its socket every trio task is
blocked, so a virtual clock would jump ahead and the model would race.

What "works" means comes from the server's trace
(``GET /v1/debug/generations/{id}``, the id from the response's
``X-Request-Id``), polled once your function has returned until one of
two things happens first: the generation ends, or the model has made
:data:`RAN_ON` tokens more than you read.  The model makes a token every
5 ms, so the second takes a quarter of a second of its time; a closed
connection reaches the server within a token or two (lesson 04, "Stopping
early": none in the notebook's run).  Neither is a timeout: the poll waits
on the trace, and ``trio.fail_after`` only bounds a check gone wrong.

The garbage collector is held off while the model is watched.  A stream
left open and dropped is closed by its cycle pass, at a moment of its own
choosing (lesson 04): the check's verdict must not depend on that moment,
and neither should your program.
"""

from __future__ import annotations

import gc
from typing import Any

import httpx
import openai
import pytest
import trio

from refimpl.config import Config
from refimpl.model import Simulate, simulated_text

# A million tokens, one every 5 ms: about 83 minutes.  Only a cancel ends it soon.
LONG = Simulate(ttft_ms=0, itl_ms=5, tokens=1_000_000)
SHORT = Simulate(ttft_ms=0, itl_ms=0, tokens=12)
READ = 3
RAN_ON = 50  # tokens made after you stopped reading: a model still running for nobody


def caller(url: str) -> tuple[openai.OpenAI, list[str]]:
    """The client your function is given, and the X-Request-Id of each
    response it gets: the id of the generation behind it."""
    ids: list[str] = []

    def note(response: httpx.Response) -> None:
        ids.append(response.headers["x-request-id"])

    http = httpx.Client(timeout=10, event_hooks={"response": [note]})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)
    return client, ids


async def call(exercise: Any, client: openai.OpenAI, question: str, n: int) -> str:
    """Your ``first_pieces``, in a worker thread, given 10 s to return."""
    with trio.move_on_after(10):
        return await trio.to_thread.run_sync(
            exercise.first_pieces, client, question, n, abandon_on_cancel=True
        )
    pytest.fail(f"first_pieces(client, {question!r}, {n}) had not returned after 10 s", pytrace=False)


async def test_the_first_pieces(exercise, start_server, observe):
    server = await start_server(Config(simulate=SHORT))
    client, _ = caller(server.url)
    try:
        three = await call(exercise, client, "Hello", READ)
        whole = await call(exercise, client, "Why stream?", 50)  # the same client again
    finally:
        await trio.to_thread.run_sync(client.close)
    observe(f"first_pieces(client, 'Hello', {READ})", repr(three))
    assert three == "".join(simulated_text("Hello", 0)[:READ])
    answer = simulated_text("Why stream?", 0)[: SHORT.tokens]
    assert whole == "".join(answer), f"an answer of {len(answer)} pieces, asked for 50: all of them"


async def settled(http: httpx.AsyncClient, url: str, gen_id: str) -> dict[str, Any]:
    """The generation's trace, once it has ended or the model has made
    :data:`RAN_ON` tokens more than were read, whichever comes first."""
    with trio.fail_after(10):
        while True:
            resp = await http.get(f"{url}/v1/debug/generations/{gen_id}")
            trace = resp.raise_for_status().json()
            if trace["finished"] or trace["completion_tokens"] >= READ + RAN_ON:
                return trace


async def test_leaving_stops_the_model(exercise, start_server, client, observe):
    server = await start_server(Config(simulate=LONG))
    sdk, ids = caller(server.url)
    gc.disable()  # no cycle pass while the model is watched (see above)
    try:
        text = await call(exercise, sdk, "Hello", READ)
        (gen_id,) = ids
        trace = await settled(client, server.url, gen_id)
    finally:
        gc.enable()
        await trio.to_thread.run_sync(sdk.close)  # closes whatever was left open
    last, made = trace["events"][-1], trace["completion_tokens"]
    shown = f"{last['name']}({last['detail']})" if last["detail"] else last["name"]
    observe(
        f"read {READ} pieces of {LONG.tokens:,} tokens and returned",
        f"the trace's last event: {shown}, {made} tokens made, {made - READ} of them after",
    )
    assert text == "".join(simulated_text("Hello", 0)[:READ])
    if not trace["finished"]:
        pytest.fail(
            f"first_pieces returned after {READ} pieces, and the model went on: {made - READ} tokens"
            " made since, for nobody, and the response still open. `break` ends the loop, not the"
            ' response (lesson 04, "The broken version: `break` and nothing else").',
            pytrace=False,
        )
    assert (last["name"], last["detail"]) == ("cancelled", "client_disconnect")
    assert made - READ < RAN_ON, "the model stopped soon after the client left"
