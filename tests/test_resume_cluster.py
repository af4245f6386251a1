"""Resumable streams across processes (issue 13, lesson 11, ``--store redis://``).

``test_resume.py`` checks one process; here every test runs the deployment
the lesson describes (``refimpl/examples/cluster.py``): a real
``redis-server``, two ``refimpl serve --store`` processes, a real nginx
dealing requests out in turn.  What ``redis_store.py`` and
``redis_mirrors.py`` promise, each checked from outside, through HTTP:

* a stream started on one worker and dropped resumes, through nginx, on the
  *other* worker, and what the client saw before and after the drop is the
  uninterrupted stream: no gap, no duplicate, the same content, finish and
  usage;
* SIGKILL the worker that generates: a reader elsewhere gets the events
  that were logged, then ``event: error`` ``generation_lost``, never a hang;
* Redis crashing and coming back mid-stream ends the live streams with
  ``store_unavailable``; every worker stays up, and a new stream works,
  resume elsewhere included;
* ``POST .../cancel`` on the other worker cancels where the generation runs;
* the grace counts readers in every process, and cancels when there are
  none anywhere;
* two readers of one mirror each get every event once;
* an id Redis does not know is a 404 in the OpenAI error shape.

Every wait is on real state (an event read, a trace, a process exit), under
a generous ``trio.fail_after``: a hang fails, nothing sleeps to synchronise.
The X-Refimpl-Worker header names the process that answered.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import trio
from cluster_fixtures import cluster_fixture  # noqa: F401 (the fixture)
from conftest import chat_body
from test_resume import URL, Reading, assert_error, ordinary, read, said

from refimpl.examples.cluster import Cluster, Worker
from refimpl.sse import Event, SSEParser

WORKER = "X-Refimpl-Worker"
#: A token every 30 ms, 20 of them: a client can leave mid-stream and come back.
STEADY = {"ttft_ms": 0, "itl_ms": 30, "tokens": 20}
#: A token every 50 ms for 50 s: still running whatever a test waits for.
ENDLESS = {"ttft_ms": 0, "itl_ms": 50, "tokens": 1000}
#: The guard on every wait for real state: a hang fails; nothing waits this long.
WAIT = 20.0
#: Between two looks at a worker's state (a poll, not a synchronising sleep).
POLL = 0.05
#: Every cluster here: quick to stop, and no access log to fill.
FLAGS: dict[str, Any] = {"drain_timeout": 1, "quiet": True}


def resumable(simulate: dict = STEADY, **extra: Any) -> dict[str, Any]:
    return chat_body(
        "Which process reads this?", seed=13, stream=True, resumable=True, simulate=simulate, **extra
    )


# -- which worker ----------------------------------------------------------------------
def answered_by(c: Cluster, resp: httpx.Response) -> Worker:
    return next(w for w in c.workers if str(w.pid) == resp.headers[WORKER])


def other(c: Cluster, worker: Worker) -> Worker:
    (rest,) = [w for w in c.workers if w is not worker]
    return rest


def events_url(base: str, gen_id: str) -> str:
    return f"{base}{URL}/{gen_id}/events"


def since(last_id: int | None) -> dict[str, str]:
    return {} if last_id is None else {"Last-Event-ID": str(last_id)}


# -- reading streams -------------------------------------------------------------------
class Reader:
    """One SSE response read in a task of its own, so the test can act while
    it runs: ``await nursery.start(Reader(client, method, url, ...).run)``
    returns once the headers are in; ``await reader.seen(n)`` waits for the
    n-th event; ``await reader.ended()``, for the whole response."""

    def __init__(self, client: httpx.AsyncClient, method: str, url: str, **request: Any) -> None:
        self.url = url
        self.send = lambda: client.stream(method, url, **request)
        self.resp: httpx.Response | None = None
        self.events: list[Event] = []
        self.raw = b""
        self.done = trio.Event()
        self._parser = SSEParser()
        self._changed = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.send() as resp:
            self.resp = resp
            task_status.started(self)
            try:
                async for chunk in resp.aiter_raw():
                    self.raw += chunk
                    self.events += self._parser.feed(chunk)
                    self._wake()
            except httpx.ReadTimeout as silence:  # the client's read timeout: not even a ping
                raise AssertionError(
                    f"{self.url} hangs after {len(self.events)} events: {self.raw!r}"
                ) from silence
        self.events += self._parser.close()
        self.done.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def seen(self, n: int) -> None:
        with trio.fail_after(WAIT):
            while len(self.events) < n and not self.done.is_set():
                await self._changed.wait()
        assert len(self.events) >= n, self.raw

    async def ended(self) -> Reading:
        with trio.fail_after(WAIT):  # a reader left hanging is the failure
            await self.done.wait()
        return self.reading

    @property
    def reading(self) -> Reading:
        return Reading(self.resp, self.raw, self.events, self._parser.retry)


async def resume_elsewhere(
    client: httpx.AsyncClient, c: Cluster, gen_id: str, last_id: int | None, not_on: Worker
) -> Reading:
    """``GET .../events`` through nginx, read to the end on a worker other
    than ``not_on``.  Round-robin makes the first try land there; should it
    not, the answer is dropped before its body (one more reader leaving) and
    the GET sent again."""
    for _ in range(2 * len(c.workers)):
        async with trio.open_nursery() as nursery:
            reader = await nursery.start(
                Reader(client, "GET", events_url(c.url, gen_id), headers=since(last_id)).run
            )
            if reader.resp.headers[WORKER] == str(not_on.pid):
                nursery.cancel_scope.cancel()
        if reader.done.is_set():
            return reader.reading
    raise AssertionError(f"nginx sent every resume of {gen_id} to worker {not_on.pid}")


def deltas(events: list[Event]) -> list[Event]:
    """The events that carry an id of their own (not a log failure's error)."""
    return [e for e in events if e.type != "error"]


def error_code(reading: Reading) -> str:
    return reading.error()["code"]


def last_block(raw: bytes) -> bytes:
    return raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]


# -- a worker's state --------------------------------------------------------------------
async def trace_ending(client: httpx.AsyncClient, worker: Worker, gen_id: str) -> tuple[str, str | None]:
    """Wait until ``worker``'s trace of ``gen_id`` has ended; its last event."""
    with trio.fail_after(WAIT):
        while True:
            resp = await client.get(f"{worker.url}/v1/debug/generations/{gen_id}")
            assert resp.status_code == 200, resp.text
            trace = resp.json()
            if trace["finished"]:
                last = trace["events"][-1]
                return last["name"], last["detail"]
            await trio.sleep(POLL)


async def trace_events(client: httpx.AsyncClient, worker: Worker, gen_id: str) -> list[dict]:
    return (await client.get(f"{worker.url}/v1/debug/generations/{gen_id}")).json()["events"]


async def metric(client: httpx.AsyncClient, worker: Worker, sample: str) -> float:
    """One sample of ``worker``'s ``/metrics``, e.g. ``refimpl_resume_logs``."""
    text = (await client.get(worker.url + "/metrics")).text
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


# -- 1. resume on another worker -------------------------------------------------------
async def assert_resumes_on_the_other_worker(client: httpx.AsyncClient, c: Cluster) -> None:
    """Drop a stream, resume it through nginx on the worker that does not
    run it: together, the uninterrupted stream of the same request."""
    body = resumable(stream_options={"include_usage": True})
    first = await read(client, "POST", c.url + URL, leave_after=5, json=body)
    assert first.resp.status_code == 200
    producer = answered_by(c, first.resp)
    mirrored_before = await metric(client, other(c, producer), 'refimpl_resumes_total{where="mirror"}')
    rest = await resume_elsewhere(client, c, first.gen_id, first.last_id, not_on=producer)
    assert rest.resp.status_code == 200 and rest.retry == 1000
    assert rest.resp.headers[WORKER] != first.resp.headers[WORKER]
    assert rest.resp.headers["x-request-id"] == first.gen_id
    events = STEADY["tokens"] + 4  # role, the tokens, finish, usage, [DONE]
    assert first.ids + rest.ids == list(range(1, events + 1))  # no gap, no duplicate
    whole = await read(client, "POST", c.url + URL, json=ordinary(body))
    assert said(first.events + rest.events) == said(whole.events)  # deltas, finish, usage
    assert json.loads(rest.events[-2].data)["usage"]["completion_tokens"] == STEADY["tokens"]
    # It was served from a mirror: the other worker's copy of the log.
    mirrored = await metric(client, other(c, producer), 'refimpl_resumes_total{where="mirror"}')
    assert mirrored == mirrored_before + 1
    assert await trace_ending(client, producer, first.gen_id) == ("done", "stop")


async def test_a_stream_dropped_on_one_worker_resumes_through_nginx_on_the_other(cluster, client):
    c = await cluster(workers=2, **FLAGS)
    await assert_resumes_on_the_other_worker(client, c)


# -- 2. the producer dies ----------------------------------------------------------------
async def test_a_killed_producer_ends_a_resume_elsewhere_with_generation_lost(cluster, client):
    """The lease runs out (3 ticks of a quarter grace: 1.5 s here), and the
    mirror, seeing no lease and nothing new, ends its readers."""
    c = await cluster(workers=2, resume_grace=2, **FLAGS)
    first = await read(client, "POST", c.url + URL, leave_after=3, json=resumable(ENDLESS))
    producer = answered_by(c, first.resp)
    survivor = other(c, producer)
    async with trio.open_nursery() as nursery:
        live = await nursery.start(
            Reader(client, "GET", events_url(survivor.url, first.gen_id), headers=since(3)).run
        )
        await live.seen(3)  # the mirror copies as the producer writes
        await trio.to_thread.run_sync(producer.kill)
        cut = await live.ended()
    assert cut.resp.status_code == 200 and not producer.alive()
    assert error_code(cut) == "generation_lost"
    assert all(e.data != "[DONE]" for e in cut.events)
    logged = deltas(cut.events)
    assert first.ids + [int(e.last_event_id) for e in logged] == list(range(1, len(logged) + 4))
    assert b"id:" not in last_block(cut.raw)  # the failure has no id: a resume asks for it again
    assert survivor.alive()

    # The resume endpoint keeps answering, through nginx (whose share for
    # the dead worker goes to the live one): everything that was logged,
    # then the same error.
    for _ in range(2):
        again = await read(client, "GET", events_url(c.url, first.gen_id))
        assert again.resp.status_code == 200 and again.resp.headers[WORKER] == str(survivor.pid)
        assert deltas(again.events) == first.events + logged
        assert error_code(again) == "generation_lost"
    assert (await client.get(c.url + "/v1/models")).status_code == 200


# -- 3. Redis restarts -------------------------------------------------------------------
async def test_redis_restarting_mid_stream_ends_it_with_store_unavailable_and_nothing_crashes(
    cluster, client
):
    """Redis comes back empty: the log of a running stream is gone, and no
    write after the restart may pretend otherwise.  60 tokens 50 ms apart:
    should the stream not end with the error, it ends with [DONE] (and the
    asserts say so) instead of running on past the guard."""
    c = await cluster(workers=2, resume_grace=2, **FLAGS)
    simulate = {"ttft_ms": 0, "itl_ms": 50, "tokens": 60}
    async with trio.open_nursery() as nursery:
        post = await nursery.start(Reader(client, "POST", c.url + URL, json=resumable(simulate)).run)
        await post.seen(3)
        producer = answered_by(c, post.resp)
        elsewhere = other(c, producer)
        gen_id = post.reading.gen_id
        mirror = await nursery.start(Reader(client, "GET", events_url(elsewhere.url, gen_id)).run)
        await mirror.seen(3)
        await trio.to_thread.run_sync(c.redis.restart)  # SIGKILL, then again on the port, empty
        live, mirrored = await post.ended(), await mirror.ended()
    for reading in (live, mirrored):
        assert all(e.data != "[DONE]" for e in reading.events), "it ran on, logging to an empty Redis"
        assert error_code(reading) == "store_unavailable"
        logged = [int(e.last_event_id) for e in deltas(reading.events)]
        assert logged == list(range(1, len(logged) + 1))
    assert await trace_ending(client, producer, gen_id) == ("error", "store_unavailable")
    # The log went with Redis: a resume is told so, never served the events
    # logged after the restart as if they followed the ones it had.
    after = await read(client, "GET", events_url(elsewhere.url, gen_id), headers=since(2))
    assert after.resp.status_code == 404, f"resumed after id 2, got ids {after.ids[:5]}..."
    assert json.loads(after.raw)["error"]["code"] == "not_found"

    # Nothing crashed: each worker answers, and a new stream works end to
    # end, a resume on the other worker included.
    for worker in c.workers:
        assert worker.alive()
        assert (await client.get(worker.url + "/v1/models")).status_code == 200
    await assert_resumes_on_the_other_worker(client, c)


# -- 4. cancel from anywhere -------------------------------------------------------------
async def test_a_cancel_sent_to_the_other_worker_stops_the_generation_where_it_runs(cluster, client):
    c = await cluster(workers=2, **FLAGS)
    async with trio.open_nursery() as nursery:
        post = await nursery.start(Reader(client, "POST", c.url + URL, json=resumable(ENDLESS)).run)
        await post.seen(3)
        producer = answered_by(c, post.resp)
        gen_id = post.reading.gen_id
        resp = await client.post(f"{other(c, producer).url}{URL}/{gen_id}/cancel")
        live = await post.ended()
    assert resp.status_code == 200 and resp.headers[WORKER] == str(other(c, producer).pid)
    assert resp.json() == {"id": gen_id, "object": "chat.completion.cancellation", "status": "cancelled"}
    assert error_code(live) == "client_cancel"
    assert all(e.data != "[DONE]" for e in live.events)
    assert live.ids == list(range(1, len(live.events) + 1))  # the error event has the next id
    assert await trace_ending(client, producer, gen_id) == ("cancelled", "client_cancel")


# -- 5. the grace counts readers everywhere -------------------------------------------------
async def test_the_grace_counts_a_reader_on_another_worker(cluster, client):
    """60 tokens 50 ms apart: 3 s, two graces long, read only on the worker
    that does not run it."""
    grace = 1.5
    c = await cluster(workers=2, resume_grace=grace, **FLAGS)
    simulate = {"ttft_ms": 0, "itl_ms": 50, "tokens": 60}
    first = await read(client, "POST", c.url + URL, leave_after=2, json=resumable(simulate))
    producer = answered_by(c, first.resp)
    rest = await read(client, "GET", events_url(other(c, producer).url, first.gen_id), headers=since(2))
    assert rest.ending.data == "[DONE]"
    assert first.ids + rest.ids == list(range(1, simulate["tokens"] + 4))
    assert await trace_ending(client, producer, first.gen_id) == ("done", "stop")
    # Not the producer's own reader: it left at once, and the model ran on
    # for longer than the grace with nobody reading in its process.
    trace = await trace_events(client, producer, first.gen_id)
    assert [e["name"] for e in trace if e["name"] in ("attached", "detached")] == ["attached", "detached"]
    left = next(e for e in trace if e["name"] == "detached")
    assert trace[-1]["at"] - left["at"] > grace


async def test_with_no_reader_anywhere_the_grace_cancels(cluster, client):
    c = await cluster(workers=2, resume_grace=1.5, **FLAGS)
    first = await read(client, "POST", c.url + URL, leave_after=2, json=resumable(ENDLESS))
    producer = answered_by(c, first.resp)
    assert await trace_ending(client, producer, first.gen_id) == ("cancelled", "client_disconnect")
    rest = await resume_elsewhere(client, c, first.gen_id, first.last_id, not_on=producer)
    assert error_code(rest) == "client_disconnect"  # and the log says so, everywhere


# -- 6. one mirror, two readers -------------------------------------------------------------
@pytest.mark.parametrize("arrival", ["one_after_the_other", "at_once"])
async def test_two_readers_on_the_other_worker_each_get_every_event_once(cluster, client, arrival):
    """The second reader comes while the first one's mirror is live, or both
    come before the worker has one (each resume then looks in Redis)."""
    c = await cluster(workers=2, **FLAGS)
    simulate = {**STEADY, "tokens": 40}
    first = await read(client, "POST", c.url + URL, leave_after=2, json=resumable(simulate))
    producer = answered_by(c, first.resp)
    elsewhere = other(c, producer)
    url = events_url(elsewhere.url, first.gen_id)
    after_two, from_start = Reader(client, "GET", url, headers=since(2)), Reader(client, "GET", url)
    async with trio.open_nursery() as nursery:
        if arrival == "one_after_the_other":
            await nursery.start(after_two.run)
            await after_two.seen(2)  # the mirror is made and live
            await nursery.start(from_start.run)
        else:  # both sent before either is answered
            nursery.start_soon(after_two.run)
            nursery.start_soon(from_start.run)
        one, two = await after_two.ended(), await from_start.ended()
    events = simulate["tokens"] + 3
    assert one.ids == list(range(3, events + 1)) and two.ids == list(range(1, events + 1))
    assert two.events == first.events + one.events
    assert await metric(client, elsewhere, 'refimpl_resumes_total{where="mirror"}') == 2
    assert await metric(client, elsewhere, "refimpl_resume_logs") == 1  # one mirror for both
    whole = await read(client, "POST", c.url + URL, json=ordinary(resumable(simulate)))
    assert said(two.events) == said(whole.events)


# -- 7. unknown ids ---------------------------------------------------------------------------
async def test_an_id_redis_does_not_know_is_404_on_every_worker(cluster, client):
    c = await cluster(workers=2, **FLAGS)
    answered = set()
    with trio.fail_after(WAIT):
        while answered != {str(w.pid) for w in c.workers}:  # round-robin: two tries
            resp = await client.get(events_url(c.url, "chatcmpl-nosuchthing"))
            error = assert_error(resp, 404, "not_found")
            assert "chatcmpl-nosuchthing" in error["message"] and "no such generation" in error["message"]
            answered.add(resp.headers[WORKER])
    assert_error(await client.post(f"{c.url}{URL}/chatcmpl-nosuchthing/cancel"), 404, "not_found")
