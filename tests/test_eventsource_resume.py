"""A browser's own ``EventSource`` on a resumable stream (lesson 11), in Chromium.

``GET /v1/chat/completions/{id}/events`` is shaped so that ``new
EventSource(url)`` needs nothing else (WHATWG HTML §9.2).  These tests let
Chromium's EventSource do what the spec says it does, and check the server
met it halfway:

* the connection breaks mid-stream; EventSource reconnects by itself, after
  the ``retry: 1000`` the resume stream sent first, with a ``Last-Event-ID``
  header; the page gets every event exactly once, in order, to ``[DONE]``;
* after ``[DONE]`` it reconnects once more (it always does when a stream
  ends), gets **204 No Content**, and stops for good: ``readyState`` CLOSED.

How the connection breaks: ``Relay`` (in ``test_demo_page.py``, which the
demo page's own resume test shares), a small trio TCP relay that the page is
loaded through.  It cuts the first stream that reaches event 7 *inside* that
event, then closes both sockets: a real cut, the one a restarted proxy or a
dropped link makes, seen by both ends.  Half an event must be dropped
(§9.2.6: only a blank line dispatches an event, and only a dispatched event
sets the last event ID), so the reconnect must say ``Last-Event-ID: 6``.
The relay keeps what Chromium sent (its ``Last-Event-ID`` headers) and the
statuses it got.

What the server saw comes from its trace (``GET /v1/debug/generations/{id}``):
``attached`` with the ``Last-Event-ID`` each reader came with.  A trace ends
at its terminal event, so a reader that arrives after the generation ended is
not in it; the generations here run for seconds, long past the 1 s before
EventSource reconnects, and the 204 is checked on the relay.

No sleeps: the page records every ``open``, ``message`` and ``error`` in
``window.seen``, and the tests wait on it with ``wait_for_function``.
"""

from __future__ import annotations

from functools import partial

import httpx
import trio
from conftest import Server, chat_body
from test_demo_page import Demo, Relay, run_page

from refimpl.sse import SSEParser

#: A token every 20 ms: long enough that EventSource's reconnect, 1 s after
#: the cut, finds the generation still running.
SLOW = {"ttft_ms": 0, "itl_ms": 20, "tokens": 150}
CUT_IN = 7  # the event the relay cuts in half

#: Opens an EventSource on the resume URL and records what it sees.
FOLLOW = """(url) => {
  window.seen = [];
  const source = (window.source = new EventSource(url));
  source.onopen = () => seen.push({ open: true });
  source.onmessage = (e) => seen.push({ id: e.lastEventId, data: e.data });
  source.onerror = () => seen.push({ error: source.readyState });
}"""
#: EventSource gave up: it reconnects no more (§9.2.3, "fail the connection").
GAVE_UP = "window.source.readyState === EventSource.CLOSED"
CONNECTING, CLOSED = 0, 2  # EventSource.readyState


# -- helpers -----------------------------------------------------------------------------
async def start_resumable(server: Server, simulate: dict) -> str:
    """POST a resumable request, read its first event, hang up; the
    generation runs on (--resume-grace).  Returns the URL to resume at."""
    body = chat_body("Resume me", seed=3, stream=True, resumable=True, simulate=simulate)
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        r.raise_for_status()
        parser = SSEParser()
        async for chunk in r.aiter_raw():
            if parser.feed(chunk):
                break
    return r.headers["Location"]


async def replay(server: Server, location: str) -> list[dict]:
    """The whole stream, from its log: what the page must have seen."""
    async with httpx.AsyncClient() as client:
        resp = await client.get(server.url + location)
    events = SSEParser().feed(resp.content)
    return [{"id": e.last_event_id, "data": e.data} for e in events]


def follow_in_chromium(server: Server, simulate: dict, demo: Demo) -> dict:
    """Start a generation (from the test), follow it with EventSource (in the
    page) until EventSource gives up; what the page saw."""
    location = trio.from_thread.run(start_resumable, server, simulate)
    demo.page.evaluate(FOLLOW, location)
    demo.page.wait_for_function(GAVE_UP)
    return {"location": location, "seen": demo.page.evaluate("window.seen")}


def attached(trace: dict) -> list[str]:
    return [e["detail"] for e in trace["events"] if e["name"] == "attached"]


# -- the tests ---------------------------------------------------------------------------
async def test_eventsource_resumes_after_a_cut_with_last_event_id(server, nursery):
    relay = await Relay(server.url, cut_in=CUT_IN).start(nursery)
    result = await run_page(relay, partial(follow_in_chromium, server, SLOW))
    location, seen = result["location"], result["seen"]
    stream = await replay(server, location)

    # Every event exactly once, in order, to [DONE]: the same as the log.
    assert [s for s in seen if "data" in s] == stream
    assert stream[-1]["data"] == "[DONE]"
    assert [s["id"] for s in stream] == [str(n) for n in range(1, len(stream) + 1)]
    # One cut (EventSource goes back to CONNECTING), one reopen; then the end
    # of the stream (CONNECTING again) and the 204 (CLOSED).
    before = [{"open": True}, *stream[: CUT_IN - 1], {"error": CONNECTING}]
    after = [{"open": True}, *stream[CUT_IN - 1 :], {"error": CONNECTING}, {"error": CLOSED}]
    assert seen == before + after

    # What Chromium sent: the resume carried the id of the last whole event.
    last = stream[-1]["id"]
    assert relay.requests_to("/events") == [(None, 200), (str(CUT_IN - 1), 200), (last, 204)]
    # What the server saw: the POST's reader (from 0), EventSource's first
    # connection (no Last-Event-ID: from 0), and its resume after the cut.
    trace = await server.trace(location.split("/")[-2])
    assert attached(trace) == ["0", "0", str(CUT_IN - 1)]
    assert trace["events"][-1]["name"] == "done"


async def test_eventsource_stops_on_204_after_done(server, nursery):
    """No cut: the stream ends with [DONE], EventSource reconnects with the
    last id, gets 204, and is CLOSED.  It does not come back: CLOSED is final
    (§9.2.3), and the relay saw exactly two GETs."""
    relay = await Relay(server.url, cut_in=None).start(nursery)
    result = await run_page(relay, partial(follow_in_chromium, server, {**SLOW, "tokens": 30}))
    location, seen = result["location"], result["seen"]
    stream = await replay(server, location)

    assert seen == [{"open": True}, *stream, {"error": CONNECTING}, {"error": CLOSED}]
    assert stream[-1]["data"] == "[DONE]"
    assert relay.requests_to("/events") == [(None, 200), (stream[-1]["id"], 204)]
    # The 204 attached no reader: the POST's and EventSource's only.
    trace = await server.trace(location.split("/")[-2])
    assert attached(trace) == ["0", "0"]
