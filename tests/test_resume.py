"""Resumable streams: ``id:``, ``Last-Event-ID`` and the replay log (lesson 11).

What ``patterns/resume.py`` and ``protocols/resume_routes.py`` promise, each
checked on a real server with real clients:

* a POST with ``"stream": true, "resumable": true`` streams the ordinary
  OpenAI chunks, byte for byte the same stream as without ``resumable``
  except that every event carries ``id: N`` (1, 2, 3, ... to the ``[DONE]``
  or the ``event: error``);
* the generation runs on when its client drops; ``GET
  /v1/chat/completions/{id}/events`` with ``Last-Event-ID: N`` (or
  ``?last_event_id=N``) sends the events after N, then the live ones, so
  what the client saw before and after the drop is the uninterrupted stream:
  no gap, no duplicate, however the resume races the end;
* 204 for a client that has the last event of an ended stream; 404 (OpenAI's
  error shape) for an id that is unknown, expired or not resumable; 400 for
  a Last-Event-ID that is not a number;
* nobody reading for ``--resume-grace`` seconds cancels the generation
  (``client_disconnect``); ``POST .../cancel`` cancels it at once
  (``client_cancel``); the bounds (``--resume-max-events``,
  ``--resume-max-generations``) end a stream or refuse one, with an error
  that names them;
* an ordinary stream is unchanged: no ids, and a client that leaves stops it.

Most tests run on trio's virtual clock (``autojump_clock``), so a 100-second
generation or a grace period costs no real time; the openai SDK runs in a
thread, on the real clock.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing
from conftest import TEST_SIMULATE, Server, chat_body

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.engine import Generation
from refimpl.patterns.resume import ReplayLog
from refimpl.sse import Event, SSEParser

URL = "/v1/chat/completions"
# A token every 20 ms: a client can leave mid-stream and come back to it.
STEADY = {"ttft_ms": 0, "itl_ms": 20, "tokens": 40}
# A token every 100 ms for 100 s: still running whatever a test waits for.
ENDLESS = {"ttft_ms": 0, "itl_ms": 100, "tokens": 1000}
EVENTS = STEADY["tokens"] + 3  # role, one per token, finish, [DONE]


def resumable(simulate: dict = STEADY, **extra: Any) -> dict[str, Any]:
    return chat_body(
        "How does a stream resume?", seed=11, stream=True, resumable=True, simulate=simulate, **extra
    )


def ordinary(body: dict[str, Any]) -> dict[str, Any]:
    """The same request without ``resumable``: the stream to compare with."""
    return {k: v for k, v in body.items() if k != "resumable"}


# -- reading streams ----------------------------------------------------------------
@dataclass
class Reading:
    """One response, parsed with our own parser (``refimpl.sse``)."""

    resp: httpx.Response
    raw: bytes
    events: list[Event]
    retry: int | None  # the stream's last ``retry:`` field

    @property
    def gen_id(self) -> str:
        return self.resp.headers["x-request-id"]

    @property
    def ids(self) -> list[int]:
        return [int(e.last_event_id) for e in self.events]

    @property
    def last_id(self) -> int:
        return self.ids[-1]

    @property
    def ending(self) -> Event:
        return self.events[-1]

    def error(self) -> dict:
        assert self.ending.type == "error"
        return json.loads(self.ending.data)["error"]


async def read(
    client: httpx.AsyncClient, method: str, url: str, leave_after: int | None = None, **kw
) -> Reading:
    """Read a stream to its end, or leave after ``leave_after`` events: close
    the response with the stream still going, as a client that drops does."""
    parser, events, raw = SSEParser(), [], b""
    async with client.stream(method, url, **kw) as resp:
        async for chunk in resp.aiter_raw():
            raw += chunk
            events += parser.feed(chunk)
            if leave_after is not None and len(events) >= leave_after:
                events = events[:leave_after]  # the client saw these, and no more
                break
    if leave_after is None:
        events += parser.close()
    return Reading(resp, raw, events, parser.retry)


async def post(server: Server, client, body: dict, leave_after: int | None = None) -> Reading:
    return await read(client, "POST", server.url + URL, leave_after, json=body)


async def resume(
    server: Server,
    client,
    gen_id: str,
    last_id: int | str | None = None,
    *,
    query: bool = False,
    leave_after: int | None = None,
) -> Reading:
    """``GET .../{id}/events``, saying the last id seen in the header (as
    EventSource does) or, with ``query``, in ``?last_event_id=``."""
    headers, params = {}, {}
    if last_id is not None and query:
        params["last_event_id"] = str(last_id)
    elif last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    url = f"{server.url}{URL}/{gen_id}/events"
    return await read(client, "GET", url, leave_after, headers=headers, params=params)


def said(events: list[Event]) -> list[tuple[str, Any]]:
    """What a stream said, minus what differs between two generations of the
    same request (the chunk ``id`` and ``created``)."""
    out = []
    for e in events:
        data = e.data if e.data == "[DONE]" else json.loads(e.data)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("id", "created")}
        out.append((e.type, data))
    return out


def content(events: list[Event]) -> str:
    chunks = [json.loads(e.data) for e in events if e.type == "message" and e.data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- waiting on the server --------------------------------------------------------------
async def until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


def replay_log(server: Server, gen_id: str) -> ReplayLog | None:
    return server.app.extensions["refimpl.resume"].registry.logs.get(gen_id)


async def ended(server: Server, gen_id: str) -> Generation:
    """Wait for the generation to end and its ending to be in the log."""
    gen = server.engine.get(gen_id)
    with trio.fail_after(10):
        await gen.ended.wait()
    log = replay_log(server, gen_id)
    if log is not None:
        await until(lambda: log.ended)
    return gen


def ending(gen: Generation) -> tuple[str, str | None]:
    last = gen.trace.events[-1]
    return last.name, last.detail


async def cancel(server: Server, client, gen_id: str) -> httpx.Response:
    return await client.post(f"{server.url}{URL}/{gen_id}/cancel")


# -- the stream itself ----------------------------------------------------------------
@pytest.mark.parametrize("usage", [False, True])
async def test_every_event_has_the_next_id_and_the_stream_is_the_ordinary_one(
    server, client, autojump_clock, usage
):
    body = resumable(stream_options={"include_usage": True}) if usage else resumable()
    got = await post(server, client, body)
    assert got.resp.status_code == 200
    assert got.resp.headers["content-type"].startswith("text/event-stream")
    assert got.resp.headers["location"] == f"{URL}/{got.gen_id}/events"
    assert got.ids == list(range(1, EVENTS + usage + 1))  # each event its own id, none inherited
    assert got.ending.data == "[DONE]"
    plain = await post(server, client, ordinary(body))
    assert said(got.events) == said(plain.events)
    assert {json.loads(e.data)["id"] for e in got.events[:-1]} == {got.gen_id}
    assert ending(await ended(server, got.gen_id)) == ("done", "stop")


@pytest.mark.parametrize("how", ["header", "query"])
async def test_a_dropped_stream_resumes_after_the_last_id_it_saw(server, client, autojump_clock, how):
    first = await post(server, client, resumable(), leave_after=5)
    gen = server.engine.get(first.gen_id)
    assert not gen.finished  # it runs on with no reader
    rest = await resume(server, client, first.gen_id, first.last_id, query=how == "query")
    assert rest.resp.status_code == 200 and rest.retry == 1000
    assert first.ids + rest.ids == list(range(1, EVENTS + 1))  # no gap, no duplicate
    plain = await post(server, client, ordinary(resumable()))
    assert said(first.events + rest.events) == said(plain.events)


async def test_the_header_wins_over_the_query(server, client, autojump_clock):
    first = await post(server, client, resumable(), leave_after=3)
    url = f"{server.url}{URL}/{first.gen_id}/events"
    rest = await read(client, "GET", url, headers={"Last-Event-ID": "3"}, params={"last_event_id": "1"})
    assert rest.ids == list(range(4, EVENTS + 1))


async def test_resuming_twice(server, client, autojump_clock):
    first = await post(server, client, resumable(), leave_after=4)
    second = await resume(server, client, first.gen_id, first.last_id, leave_after=7)
    third = await resume(server, client, first.gen_id, second.last_id)
    assert first.ids + second.ids + third.ids == list(range(1, EVENTS + 1))
    plain = await post(server, client, ordinary(resumable()))
    assert said(first.events + second.events + third.events) == said(plain.events)


async def test_without_last_event_id_a_resume_starts_at_the_first_event(server, client, autojump_clock):
    first = await post(server, client, resumable(), leave_after=5)
    again = await resume(server, client, first.gen_id)
    assert again.ids == list(range(1, EVENTS + 1))
    assert said(again.events[:5]) == said(first.events)
    assert again.ending.data == "[DONE]"


async def test_a_resume_while_running_follows_the_live_events_to_done(server, client, autojump_clock):
    first = await post(server, client, resumable(), leave_after=5)
    gen = server.engine.get(first.gen_id)
    await until(lambda: replay_log(server, gen.id).readers == 0)  # the server saw the drop
    rest = await resume(server, client, gen.id, 5)
    assert rest.resp.status_code == 200
    assert rest.resp.headers["content-type"].startswith("text/event-stream")
    assert rest.resp.headers["x-request-id"] == gen.id
    assert rest.raw.startswith(b"retry: 1000\n\n")  # EventSource: reconnect after 1 s
    assert rest.ids == list(range(6, EVENTS + 1)) and rest.ending.data == "[DONE]"
    # The trace: the POST's reader (after 0) left, the GET's (after 5) came
    # while the model was still running, and it ran to the end.
    names = [(e.name, e.detail) for e in gen.trace.events if e.name in ("attached", "detached", "done")]
    assert names == [("attached", "0"), ("detached", None), ("attached", "5"), ("done", "stop")]


async def test_two_readers_at_once_each_get_every_event(server, client, autojump_clock):
    results: dict[str, Reading] = {}

    async def reader(name: str, go) -> None:
        results[name] = await go()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "post", lambda: post(server, client, resumable()))
        await until(lambda: server.engine.active)
        (gen_id,) = server.engine.active
        nursery.start_soon(reader, "get", lambda: resume(server, client, gen_id))
    assert results["post"].events == results["get"].events
    assert results["get"].ids == list(range(1, EVENTS + 1))


# -- racing the end -----------------------------------------------------------------------
async def test_a_resume_after_the_end_gets_exactly_the_rest(server, client, autojump_clock):
    first = await post(server, client, resumable(), leave_after=9)
    gen = await ended(server, first.gen_id)
    assert ending(gen) == ("done", "stop")
    rest = await resume(server, client, gen.id, 9)
    assert rest.ids == list(range(10, EVENTS + 1)) and rest.ending.data == "[DONE]"
    plain = await post(server, client, ordinary(resumable()))
    assert said(first.events + rest.events) == said(plain.events)


@pytest.mark.parametrize("beyond", [0, 1, 1000])
async def test_a_client_with_the_last_event_gets_204(server, client, autojump_clock, beyond):
    """204 No Content: the answer that makes EventSource stop reconnecting,
    also for an id past the end (the client cannot need anything more)."""
    whole = await post(server, client, resumable())
    await ended(server, whole.gen_id)
    resp = await client.get(
        f"{server.url}{URL}/{whole.gen_id}/events", headers={"Last-Event-ID": str(whole.last_id + beyond)}
    )
    assert resp.status_code == 204 and resp.content == b""
    assert resp.headers["x-request-id"] == whole.gen_id


# -- errors before the stream ---------------------------------------------------------------
def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    return error


async def test_unknown_and_not_resumable_ids_are_404(server, client, autojump_clock):
    resp = await client.get(f"{server.url}{URL}/chatcmpl-nosuchthing/events")
    error = assert_error(resp, 404, "not_found")
    assert "no such generation" in error["message"] and "chatcmpl-nosuchthing" in error["message"]
    plain = await post(server, client, ordinary(resumable()), leave_after=2)
    resp = await client.get(f"{server.url}{URL}/{plain.gen_id}/events")
    error = assert_error(resp, 404, "not_found")
    assert 'it was not requested with "resumable": true' in error["message"]


async def test_a_finished_log_is_forgotten_after_the_window(start_server, client, autojump_clock):
    server = await start_server(resume_window=0.2)
    whole = await post(server, client, resumable())
    await ended(server, whole.gen_id)
    log = replay_log(server, whole.gen_id)
    events_url = f"{server.url}{URL}/{whole.gen_id}/events"
    assert (await client.get(events_url, headers={"Last-Event-ID": "1"})).status_code == 200  # still there
    await trio.sleep_until(log.ended_at + 0.2)  # the window, on trio's clock, and no longer
    error = assert_error(await client.get(events_url), 404, "not_found")
    # Expired, not "never resumable": the message must not send the reader
    # looking for a missing "resumable": true in a request that had it.
    assert "--resume-window" in error["message"], error["message"]


@pytest.mark.parametrize(
    ("where", "value"),
    [("headers", "abc"), ("headers", "-1"), ("headers", "1.5"), ("params", "abc"), ("params", "\u0663")],
)
async def test_a_last_event_id_that_is_not_a_number_is_400(server, client, autojump_clock, where, value):
    """Digits only, and ASCII ones: ``int()`` would take an Arabic-Indic three."""
    first = await post(server, client, resumable(), leave_after=2)
    url = f"{server.url}{URL}/{first.gen_id}/events"
    key = "Last-Event-ID" if where == "headers" else "last_event_id"
    error = assert_error(
        await client.get(url, **{where: {key: value}}), 400, "invalid_value", "Last-Event-ID"
    )
    assert repr(value) in error["message"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stream": False, "resumable": True}, "'resumable' is only allowed when 'stream' is enabled."),
        ({"resumable": True}, "'resumable' is only allowed when 'stream' is enabled."),
        ({"stream": True, "resumable": "yes"}, "'resumable' must be a boolean."),
        ({"stream": True, "resumable": 1}, "'resumable' must be a boolean."),
    ],
)
async def test_resumable_needs_a_stream_and_a_boolean(server, client, extra, message):
    resp = await client.post(server.url + URL, json=chat_body(**extra))
    assert assert_error(resp, 400, "invalid_value", "resumable")["message"] == message
    assert not server.engine.active


# -- the grace ---------------------------------------------------------------------------
async def test_no_reader_for_the_grace_cancels_and_a_resume_replays_the_error(
    start_server, client, autojump_clock
):
    server = await start_server(resume_grace=0.3)
    first = await post(server, client, resumable(ENDLESS), leave_after=3)
    gen = await ended(server, first.gen_id)
    assert ending(gen) == ("cancelled", "client_disconnect")
    left = next(e for e in gen.trace.events if e.name == "detached")
    assert gen.trace.events[-1].at - left.at >= 0.3  # not before the grace was over
    assert gen.completion_tokens < ENDLESS["tokens"]
    rest = await resume(server, client, gen.id, first.last_id)
    assert first.ids + rest.ids == list(range(1, rest.last_id + 1))
    assert rest.error()["code"] == "client_disconnect"
    assert "--resume-grace" in rest.error()["message"]
    assert all(e.data != "[DONE]" for e in rest.events)
    # The log holds the ending: the client that has it is told to stop.
    again = await client.get(
        f"{server.url}{URL}/{gen.id}/events", headers={"Last-Event-ID": str(rest.last_id)}
    )
    assert again.status_code == 204


async def test_an_attached_reader_keeps_the_generation_past_the_grace(start_server, client, autojump_clock):
    """20 tokens 100 ms apart: 2 s of generation, seven graces long, read by
    a resume that stays attached throughout."""
    server = await start_server(resume_grace=0.3)
    simulate = {"ttft_ms": 0, "itl_ms": 100, "tokens": 20}
    first = await post(server, client, resumable(simulate), leave_after=1)
    rest = await resume(server, client, first.gen_id, 1)
    gen = await ended(server, first.gen_id)
    assert ending(gen) == ("done", "stop")
    attached = [e for e in gen.trace.events if e.name == "attached"][-1]
    assert gen.trace.events[-1].at - attached.at > 0.3 * 5
    assert rest.ending.data == "[DONE]" and first.ids + rest.ids == list(range(1, 20 + 4))


# -- POST .../cancel ------------------------------------------------------------------------
async def test_cancel_a_running_resumable_stream(server, client, autojump_clock):
    first = await post(server, client, resumable(ENDLESS), leave_after=4)
    gen = server.engine.get(first.gen_id)
    results: dict[str, Reading] = {}

    async def reader() -> None:
        results["live"] = await resume(server, client, gen.id, first.last_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await until(lambda: replay_log(server, gen.id).readers == 1)  # a reader follows it live
        resp = await cancel(server, client, gen.id)
    assert resp.status_code == 200
    assert resp.json() == {"id": gen.id, "object": "chat.completion.cancellation", "status": "cancelled"}
    assert ending(gen) == ("cancelled", "client_cancel")
    live = results["live"]
    assert live.error()["code"] == "client_cancel"
    assert all(e.data != "[DONE]" for e in live.events)
    assert first.ids + live.ids == list(range(1, live.last_id + 1))  # the error event has the next id
    assert (await cancel(server, client, gen.id)).json()["status"] == "cancelled"  # safe to retry


async def test_cancel_a_finished_generation_reports_completed_and_changes_nothing(
    server, client, autojump_clock
):
    whole = await post(server, client, resumable())
    gen = await ended(server, whole.gen_id)
    for _ in range(2):  # idempotent
        resp = await cancel(server, client, gen.id)
        assert resp.json() == {"id": gen.id, "object": "chat.completion.cancellation", "status": "completed"}
    assert ending(gen) == ("done", "stop")
    again = await resume(server, client, gen.id, EVENTS - 1)  # the log is unchanged too
    assert again.ids == [EVENTS] and again.ending.data == "[DONE]"


async def test_cancel_of_an_unknown_id_is_404(server, client):
    error = assert_error(await cancel(server, client, "chatcmpl-nosuchthing"), 404, "not_found")
    assert "chatcmpl-nosuchthing" in error["message"]


async def test_cancel_stops_an_ordinary_stream_too(server, client, autojump_clock):
    results: dict[str, Reading] = {}

    async def reader() -> None:
        results["post"] = await post(server, client, ordinary(resumable(ENDLESS)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await until(lambda: server.engine.active)
        (gen,) = server.engine.active.values()
        resp = await cancel(server, client, gen.id)
    assert resp.json()["status"] == "cancelled"
    assert ending(gen) == ("cancelled", "client_cancel")
    live = results["post"]
    assert live.error()["code"] == "client_cancel"
    assert all(e.data != "[DONE]" for e in live.events)


# -- the bounds ------------------------------------------------------------------------------
async def test_a_full_log_ends_the_generation_with_resume_log_full(start_server, client, autojump_clock):
    server = await start_server(resume_max_events=10)
    got = await post(server, client, resumable())
    assert got.ids == list(range(1, len(got.events) + 1)) and len(got.events) <= 10
    error = got.error()
    assert error["code"] == "resume_log_full" and "10 events" in error["message"]
    gen = server.engine.get(got.gen_id)
    assert ending(gen) == ("error", "resume_log_full")
    assert (await cancel(server, client, gen.id)).json()["status"] == "failed"
    sent = content(got.events)  # what the log held: the start of the ordinary stream
    assert sent and content((await post(server, client, ordinary(resumable()))).events).startswith(sent)


@pytest.mark.parametrize(("usage", "tokens"), [(True, 6), (False, 7)])
async def test_a_stream_of_exactly_the_limit_fits(start_server, client, autojump_clock, usage, tokens):
    """Role, the tokens, finish, (usage,) [DONE]: 10 events, the limit, which
    a generation "may log" (config.py); only past it is the log full."""
    server = await start_server(resume_max_events=10)
    options = {"stream_options": {"include_usage": True}} if usage else {}
    got = await post(server, client, resumable({**STEADY, "tokens": tokens}, **options))
    assert got.ids == list(range(1, 11)) and got.ending.data == "[DONE]", got.ending.data


async def test_too_many_running_resumable_streams_is_429_and_finished_ones_make_room(
    start_server, client, autojump_clock
):
    server = await start_server(resume_max_generations=1)
    running = await post(server, client, resumable(ENDLESS), leave_after=1)
    refused = await client.post(server.url + URL, json=resumable())
    error = assert_error(refused, 429, "too_many_resumable_streams")
    assert "--resume-max-generations 1" in error["message"]
    assert len(server.engine.active) == 1  # the refused one never started
    plain = await post(server, client, ordinary(resumable()))  # the bound is on logs only
    assert plain.ending.data == "[DONE]"
    await cancel(server, client, running.gen_id)
    await ended(server, running.gen_id)
    # The one log now belongs to a finished generation: the next is
    # accepted, and the finished one is forgotten to make room.
    nxt = await post(server, client, resumable())
    assert nxt.ending.data == "[DONE]"
    assert (await client.get(f"{server.url}{URL}/{running.gen_id}/events")).status_code == 404


# -- clients ---------------------------------------------------------------------------------
async def test_the_openai_sdk_reads_a_resumable_stream_and_its_chunk_id_resumes_it(server, client):
    """The SDK ignores ``id:`` fields: it streams as ever.  The id of its
    chunks is the generation's, so a client can resume with it after
    reading ``n`` chunks (one event each: Last-Event-ID ``n``)."""
    body = resumable()
    extra = {"resumable": True, "seed": body["seed"], "simulate": body["simulate"]}

    async def run() -> tuple[str, str, str]:
        sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        kwargs = {"model": body["model"], "messages": body["messages"], "stream": True, "extra_body": extra}
        whole = "".join(
            [c.choices[0].delta.content or "" async for c in await sdk.chat.completions.create(**kwargs)]
        )
        stream = await sdk.chat.completions.create(**kwargs)
        seen = []
        async for chunk in stream:
            seen.append(chunk)
            if len(seen) == 3:
                break
        await stream.close()
        await sdk.close()
        return whole, "".join(c.choices[0].delta.content or "" for c in seen), seen[0].id

    whole, head, gen_id = await trio.to_thread.run_sync(asyncio.run, run())
    plain = await post(server, client, ordinary(body))
    assert whole == content(plain.events)
    rest = await resume(server, client, gen_id, 3)
    assert rest.ids[0] == 4 and rest.ending.data == "[DONE]"
    assert head + content(rest.events) == whole


async def test_an_ordinary_stream_has_no_ids_and_stops_when_its_client_leaves(server, client, autojump_clock):
    got = await post(server, client, ordinary(resumable(ENDLESS)), leave_after=3)
    assert b"id:" not in got.raw and all(e.last_event_id == "" for e in got.events)
    assert "location" not in got.resp.headers
    gen = server.engine.get(got.gen_id)
    with trio.fail_after(10):
        await gen.ended.wait()
    assert ending(gen) == ("cancelled", "client_disconnect")
    assert gen.trace.events[-1].at - gen.trace.events[0].at < 1  # not a grace later: at once
    assert replay_log(server, gen.id) is None


async def test_a_resume_sends_heartbeats_while_the_model_is_silent(start_server, client, autojump_clock):
    server = await start_server(heartbeat=0.5)
    first = await post(server, client, resumable({**STEADY, "ttft_ms": 3000}), leave_after=1)
    rest = await resume(server, client, first.gen_id, 1)
    before_first_token = rest.raw.split(b"id: 2\n")[0]
    assert before_first_token.count(b": ping\n\n") >= 4  # 3 s of silence, a ping each 0.5 s
    assert rest.ids == list(range(2, EVENTS + 1))  # and the parser saw only the events
    gen = server.engine.get(first.gen_id)
    assert "heartbeat" in gen.trace.names()


# -- shutdown --------------------------------------------------------------------------------
async def test_shutdown_ends_a_resumable_stream_with_an_error_event(nursery, autojump_clock):
    app = create_app(Config(simulate=TEST_SIMULATE, drain_timeout=1.0))
    engine, trigger, stopped = app.extensions["refimpl.engine"], trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    server = Server(await nursery.start(run_server), app)
    results: dict[str, Reading] = {}
    async with httpx.AsyncClient(timeout=30) as client:

        async def reader() -> None:
            results["post"] = await post(server, client, resumable({"ttft_ms": 60_000}))

        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            await until(lambda: engine.active)
            (gen,) = engine.active.values()
            trigger.set()
    with trio.fail_after(30):
        await stopped.wait()
    assert ending(gen) == ("cancelled", "shutdown")
    live = results["post"]
    assert live.error()["code"] == "server_shutdown"
    assert live.ids == list(range(1, len(live.events) + 1))
    assert all(e.data != "[DONE]" for e in live.events)
