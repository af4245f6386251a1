"""The demo page in real headless Chromium, against a real server.

The page is the first thing a new user sees after ``make run``.  These tests
drive it the way they do: set the knobs, pick a protocol, click **Send**,
watch tokens land, click **Stop**.  Each test proves one promise of the page:

* the live numbers (TTFT, tokens, tokens/s, last ITL) move *while* tokens
  stream, not only at the end (the bug: the status stayed at "waiting for
  the first token…" for the whole stream);
* the WebSocket (turn after turn on one socket) and gRPC via Connect carry
  the same text as SSE;
* the knobs reach the server (the generation's own ``simulate`` settings);
* a mid-stream failure, and a request refused before the stream, are shown
  as errors with their (OpenAI) code and message, and the status says
  "failed"; over Connect the code comes from the end-of-stream envelope's
  ``google.rpc.ErrorInfo``;
* SSE heartbeats (``: ping``) are counted on the page, one for each the
  server's trace recorded; WebSocket pings are said to be invisible, and
  drawn from the trace;
* the timeline SVG holds exactly the trace's events;
* Stop cancels the generation: ``client_disconnect`` on SSE (the page hangs
  up), ``client_cancel`` on WebSocket (the page sends a cancel message) and
  on Connect (the page hangs up, and a gRPC server cannot tell why).

How the Connect transport decodes an envelope split across network reads is
tested in Node (``tests/js/connect_envelope.test.mjs``): a browser gives no
say over where its reads end.

Waits use Playwright's auto-retrying ``expect`` and ``wait_for_function``:
no sleeps, and no assertion on how long anything took.  Chromium is Debian's
``/usr/bin/chromium`` (``.ci/run`` installs it), driven by Playwright's sync
API in a worker thread, since the server shares the test's trio loop.  The
pings test saves a screenshot to ``bench-results/demo-page.png`` (ignored by
git) and prints its path.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import expect, sync_playwright

from refimpl.model import Simulate

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "bench-results" / "demo-page.png"
ENDED = re.compile(r"^(done|failed|stopped|cancelled)")
WS_PINGS = "not visible to browser JS on WebSocket"
CONNECT_PINGS = "none on Connect"


@dataclass
class Demo:
    """The page, in the words of the page: knobs, buttons, what it shows."""

    page: Any  # playwright.sync_api.Page

    def knobs(
        self,
        *,
        tokens: int,
        ttft: int = 0,
        itl: int = 0,
        fail_after: int | None = None,
        fail_with: str = "overloaded",
    ) -> None:
        self.page.fill("#tokens", str(tokens))
        self.page.fill("#ttft", str(ttft))
        self.page.fill("#itl", str(itl))
        self.page.fill("#fail-after", "" if fail_after is None else str(fail_after))
        self.page.select_option("#fail-with", fail_with)

    def protocol(self, name: str) -> None:
        self.page.check(f"input[name=protocol][value={name}]")

    def text(self, selector: str) -> str:
        return self.page.text_content(selector) or ""

    def number(self, stat: str) -> int:
        return int(self.text(f"#stat-{stat}"))

    def turn(self) -> str:
        """Send, wait for the end and for the finished trace; return the status."""
        self.page.click("#send")
        expect(self.page.locator("#status")).to_have_text(ENDED)
        return self.wait_for_trace()

    def wait_for_trace(self) -> str:
        last = "#timeline :is([data-event=done], [data-event=error], [data-event=cancelled])"
        expect(self.page.locator(last)).to_have_count(1)
        return self.text("#status")

    def generation_id(self) -> str:
        return self.text("#generation a")

    def timeline(self) -> list[tuple[str, str, int]]:
        """The events drawn in the SVG: (name, detail, tokens), in order."""
        return [
            (e["event"], e["detail"], int(e["tokens"]))
            for e in self.page.eval_on_selector_all(
                "#timeline [data-event]", "els => els.map(e => e.dataset)"
            )
        ]


def in_chromium(url: str, drive: Callable[[Demo], Any]) -> Any:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/")
            result = drive(Demo(page))
            assert not errors, f"JavaScript errors on the page: {errors}"
            return result
        finally:
            browser.close()


async def run_page(server, drive: Callable[[Demo], Any]) -> Any:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat before the test)
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(partial(in_chromium, server.url, drive), abandon_on_cancel=True)


def drawn_as_traced(trace: dict) -> list[tuple[str, str, int]]:
    """What the timeline must show for this trace: every event, in order."""
    return [(e["name"], e["detail"] or "", e["tokens"]) for e in trace["events"]]


#: The live numbers, read in one go while the page says "streaming…", has at
#: least ``min`` tokens and a rate (two tokens in one read leave none yet);
#: null (keep waiting) otherwise.
LIVE_NUMBERS = """(min) => {
  const text = (id) => document.getElementById(id).textContent;
  if (text("status") !== "streaming…" || Number(text("stat-tokens")) < min) return null;
  if (text("stat-rate") === "—") return null;
  const stats = ["tokens", "ttft", "rate", "itl"].map((s) => [s, text(`stat-${s}`)]);
  return Object.fromEntries(stats);
}"""


async def test_status_is_live_while_tokens_stream(server):
    def drive(demo: Demo) -> dict:
        demo.knobs(tokens=60, ttft=500, itl=30)
        demo.page.click("#send")
        expect(demo.page.locator("#status")).to_have_text("waiting for the first token…")
        # Two looks while it streams: the count rose between them.
        early = demo.page.wait_for_function(LIVE_NUMBERS, arg=3).json_value()
        later = demo.page.wait_for_function(LIVE_NUMBERS, arg=int(early["tokens"]) + 3).json_value()
        status = demo.wait_for_trace()
        end = {"status": status, "tokens": demo.text("#stat-tokens"), "id": demo.generation_id()}
        return {"early": early, "later": later, "end": end, "timeline": demo.timeline()}

    seen = await run_page(server, drive)
    early, later, end = seen["early"], seen["later"], seen["end"]
    assert int(early["tokens"]) < int(later["tokens"]) < 60
    for live in (early, later):
        assert re.fullmatch(r"\d+ ms", live["ttft"]), live
        assert re.fullmatch(r"\d+\.\d", live["rate"]), live  # tokens/s
        assert re.fullmatch(r"\d+ ms", live["itl"]), live  # the last token's ITL
    assert end["status"].startswith("done: 60 tokens") and end["status"].endswith("finish_reason stop")
    assert end["tokens"] == "60"
    trace = await server.trace(end["id"])
    assert seen["timeline"] == drawn_as_traced(trace)
    assert seen["timeline"][0][0] == "accepted" and seen["timeline"][-1] == ("done", "stop", 60)
    assert ("first_token", "", 1) in seen["timeline"]


@pytest.mark.parametrize(
    ("protocol", "traced_as", "pings"),
    [("websocket", "websocket", WS_PINGS), ("connect", "grpc", CONNECT_PINGS)],
)
async def test_other_protocols_show_the_same_text_as_sse(server, protocol, traced_as, pings):
    def drive(demo: Demo) -> dict:
        demo.knobs(tokens=25, itl=5)
        sse = {"status": demo.turn(), "output": demo.text("#output"), "id": demo.generation_id()}
        demo.protocol(protocol)
        turns = [{"status": demo.turn(), "output": demo.text("#output"), "id": demo.generation_id()}]
        turns.append({"status": demo.turn(), "output": demo.text("#output"), "id": demo.generation_id()})
        return {"sse": sse, "turns": turns, "pings": demo.text("#stat-pings"), "timeline": demo.timeline()}

    seen = await run_page(server, drive)
    assert seen["sse"]["status"].startswith("done: 25 tokens")
    assert len(seen["sse"]["output"].split()) >= 5
    for turn in seen["turns"]:  # two turns (on WebSocket, one socket: the page opens it once)
        assert turn["status"].startswith("done: 25 tokens")
        assert turn["status"].endswith("finish_reason stop")
        assert turn["output"] == seen["sse"]["output"]
        assert (await server.trace(turn["id"]))["protocol"] == traced_as
    assert (await server.trace(seen["sse"]["id"]))["protocol"] == "sse"
    assert seen["pings"].startswith(pings)
    assert seen["timeline"] == drawn_as_traced(await server.trace(seen["turns"][1]["id"]))


@pytest.mark.parametrize("protocol", ["sse", "websocket", "connect"])
async def test_knobs_reach_the_server(server, protocol):
    def drive(demo: Demo) -> dict:
        demo.protocol(protocol)
        demo.knobs(tokens=7, ttft=3, itl=2)
        return {"status": demo.turn(), "usage": demo.text("#usage"), "id": demo.generation_id()}

    seen = await run_page(server, drive)
    gen = server.engine.get(seen["id"])
    assert gen.request.simulate == Simulate(ttft_ms=3, itl_ms=2, tokens=7)
    assert (await server.trace(seen["id"]))["completion_tokens"] == 7
    assert '"completion_tokens":7' in seen["usage"]
    assert seen["status"].startswith("done: 7 tokens")


#: The message under the error, per protocol.  Connect's reads as connect-es
#: shows it: the Connect code, then the server's message, which starts with
#: the OpenAI code and ends with the generation (patterns/errors.py).
FAILED_MESSAGE = "The model failed while generating (overloaded)."
FAILED_MESSAGES = {
    "sse": FAILED_MESSAGE,
    "websocket": FAILED_MESSAGE,
    "connect": f"[unavailable] overloaded: {FAILED_MESSAGE} (generation {{id}})",
}


@pytest.mark.parametrize("protocol", ["sse", "websocket", "connect"])
async def test_a_midstream_failure_is_shown_as_an_error(server, protocol):
    def drive(demo: Demo) -> dict:
        demo.protocol(protocol)
        demo.knobs(tokens=20, itl=5, fail_after=3, fail_with="overloaded")
        status = demo.turn()
        expect(demo.page.locator("#error")).to_be_visible()
        return {
            "status": status,
            "code": demo.text("#error-code"),
            "message": demo.text("#error-message"),
            "role": demo.page.get_attribute("#error", "role"),
            "output": demo.text("#output"),
            "timeline": demo.timeline(),
            "id": demo.generation_id(),
        }

    seen = await run_page(server, drive)
    assert seen["status"] == "failed: overloaded after 3 tokens"
    assert seen["code"] == "overloaded · server_error"
    assert seen["message"] == FAILED_MESSAGES[protocol].format(id=seen["id"])
    assert seen["role"] == "alert"
    assert seen["output"]  # the partial text stays, under an error, not a "done"
    assert seen["timeline"][-1] == ("error", "overloaded", 3)
    assert seen["timeline"] == drawn_as_traced(await server.trace(seen["id"]))


@pytest.mark.parametrize(
    ("protocol", "code"),
    [
        ("sse", "HTTP 400 · invalid_value · invalid_request_error"),
        # A Connect stream is a 200 even when refused: the error is in its
        # end-of-stream envelope, code invalid_argument.
        ("connect", "invalid_value · invalid_request_error"),
    ],
)
async def test_a_refused_request_is_shown_as_an_error(server, protocol, code):
    def drive(demo: Demo) -> dict:
        demo.protocol(protocol)
        demo.knobs(tokens=-1)  # simulate.tokens must be >= 0: HTTP 400
        demo.page.click("#send")
        expect(demo.page.locator("#error")).to_be_visible()
        expect(demo.page.locator("#trace")).to_contain_text("no generation")
        return {
            "status": demo.text("#status"),
            "code": demo.text("#error-code"),
            "message": demo.text("#error-message"),
            "timeline": demo.timeline(),
        }

    seen = await run_page(server, drive)
    assert seen["status"] == "failed: invalid_value after 0 tokens"
    assert seen["code"] == code
    assert "'simulate.tokens' must be a number from 0 to 1e9." in seen["message"]
    assert seen["timeline"] == []  # no generation, so no trace


async def test_pings_are_shown(start_server):
    # Heartbeats every 0.2 s of silence, and a first token 1.5 s away: the
    # page must count SSE pings while it waits.  WebSocket pings every 0.2 s
    # too: the page cannot see them, the trace can.
    server = await start_server(heartbeat=0.2, ws_ping_interval=0.2)

    def drive(demo: Demo) -> dict:
        demo.knobs(tokens=30, ttft=1500, itl=20)
        demo.page.click("#send")
        waiting = "document.getElementById('status').textContent.startsWith('waiting')"
        pings = "parseInt(document.getElementById('stat-pings').textContent) >= 2"
        demo.page.wait_for_function(f"{waiting} && {pings}")
        sse = {"status": demo.wait_for_trace(), "pings": demo.text("#stat-pings")}
        sse |= {"timeline": demo.timeline(), "id": demo.generation_id()}
        SCREENSHOT.parent.mkdir(exist_ok=True)
        demo.page.screenshot(path=SCREENSHOT, full_page=True)
        demo.protocol("websocket")
        ws = {"status": demo.turn(), "pings": demo.text("#stat-pings")}
        ws |= {"timeline": demo.timeline(), "id": demo.generation_id()}
        return {"sse": sse, "ws": ws}

    seen = await run_page(server, drive)
    print(f"demo page screenshot: {SCREENSHOT}")
    sse, ws = seen["sse"], seen["ws"]
    assert sse["status"].startswith("done: 30 tokens")
    beats = [e for e in sse["timeline"] if e[0] == "heartbeat"]
    assert len(beats) >= 2
    # Every ping the server sent reached the page, and was counted once.
    assert sse["pings"].startswith(f"{len(beats)} (last at ")
    assert sse["timeline"] == drawn_as_traced(await server.trace(sse["id"]))
    assert ws["status"].startswith("done: 30 tokens")
    assert ws["pings"].startswith(WS_PINGS)
    assert any(name == "heartbeat" for name, _, _ in ws["timeline"])
    assert ws["timeline"] == drawn_as_traced(await server.trace(ws["id"]))


@pytest.mark.parametrize(
    ("protocol", "reason"),
    [("sse", "client_disconnect"), ("websocket", "client_cancel"), ("connect", "client_cancel")],
)
async def test_stop_cancels_the_generation(server, protocol, reason):
    def drive(demo: Demo) -> dict:
        demo.protocol(protocol)
        demo.knobs(tokens=2000, itl=20)
        demo.page.click("#send")
        demo.page.wait_for_function("Number(document.getElementById('stat-tokens').textContent) > 5")
        demo.page.click("#stop")
        stopped = {"status": demo.wait_for_trace(), "timeline": demo.timeline(), "id": demo.generation_id()}
        demo.knobs(tokens=3)  # and the page (on WS: the same socket) takes the next turn
        return {"stopped": stopped, "next": demo.turn()}

    seen = await run_page(server, drive)
    stopped = seen["stopped"]
    assert stopped["status"] == "stopped by you"
    name, detail, tokens = stopped["timeline"][-1]
    assert (name, detail) == ("cancelled", reason) and 5 < tokens < 2000
    trace = await server.trace(stopped["id"])
    assert stopped["timeline"] == drawn_as_traced(trace)
    assert seen["next"].startswith("done: 3 tokens")
    assert not server.engine.active


# -- resumable streams (lesson 11): a connection that breaks -------------------------
REQUEST_LINE = re.compile(rb"(GET|POST) (\S+) HTTP/1\.1\r\n(.*?)\r\n\r\n", re.DOTALL)
LAST_EVENT_ID = re.compile(rb"^last-event-id: *(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@dataclass
class Exchange:
    """One request through the relay and the status it got (None: none yet)."""

    method: str
    path: str
    last_event_id: str | None  # the header as the browser sent it; None: absent
    status: int | None = None


class Relay:
    """A TCP relay between Chromium and the server at ``target`` that breaks one stream.

    Chromium loads the page from ``url``, so every request of the page goes
    through it, byte for byte both ways.  Given ``cut_in=N``, the first
    stream that reaches event N (``id: N``: only resumable streams number
    their events) is cut *inside* it: the relay forwards that event's id line
    and the start of its ``data:``, then closes both sockets.  A real cut, the
    one a restarted proxy or a dropped link makes: the browser sees a chunked
    body end mid-chunk, the server sees its client go, and event N arrived in
    half.  A reader must drop half an event (WHATWG HTML §9.2.6: only a blank
    line dispatches it, only a dispatched event sets the last event ID), so a
    correct resume says ``Last-Event-ID: N-1``.

    It keeps every request it forwarded (:attr:`exchanges`): what the
    browser really sent (``Last-Event-ID``) and the status it got."""

    def __init__(self, target: str, cut_in: int | None) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        # The bytes the cut falls after.  The server writes whole events, so
        # chunk boundaries fall between them and these bytes arrive together.
        self.cut_at = None if cut_in is None else f"\nid: {cut_in}\ndata: ".encode()
        self.cuts = 0
        self.exchanges: list[Exchange] = []  # in the order the browser sent them
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> Relay:
        listeners = await nursery.start(partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1"))
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    def requests_to(self, suffix: str) -> list[tuple[str | None, int | None]]:
        """(Last-Event-ID, status) of each request to a path ending in ``suffix``."""
        return [(x.last_event_id, x.status) for x in self.exchanges if x.path.endswith(suffix)]

    async def _relay(self, browser: trio.SocketStream) -> None:
        mine: list[Exchange] = []  # this connection's requests, in order
        async with (
            browser,
            await trio.open_tcp_stream(*self.target) as server,
            trio.open_nursery() as nursery,
        ):
            # When either direction ends, both sockets close: the relay is
            # one connection, not two half-closed ones.
            nursery.start_soon(self._up, browser, server, mine, nursery.cancel_scope)
            nursery.start_soon(self._down, server, browser, mine, nursery.cancel_scope)

    async def _up(self, browser, server, mine: list[Exchange], done: trio.CancelScope) -> None:
        sent, scanned = bytearray(), 0
        try:
            async for data in browser:
                sent += data
                for m in REQUEST_LINE.finditer(sent, scanned):
                    scanned = m.end()
                    header = LAST_EVENT_ID.search(m[3])
                    mine.append(Exchange(m[1].decode(), m[2].decode(), header and header[1].decode()))
                    self.exchanges.append(mine[-1])
                await server.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a side hung up hard: so does the relay
        done.cancel()

    async def _down(self, server, browser, mine: list[Exchange], done: trio.CancelScope) -> None:
        got, scanned = bytearray(), 0
        try:
            async for data in server:
                got += data
                cut = self._cut_point(got)
                if cut is not None:
                    data = data[: len(data) - (len(got) - cut)]
                    del got[cut:]
                for m in STATUS_LINE.finditer(got, scanned):
                    scanned = m.end()
                    next(x for x in mine if x.status is None).status = int(m[1])
                await browser.send_all(data)
                if cut is not None:
                    break  # the cut: both sockets close now, mid-event
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def _cut_point(self, got: bytearray) -> int | None:
        if self.cut_at is None or self.cuts or (i := got.find(self.cut_at)) == -1:
            return None
        self.cuts += 1
        return i + len(self.cut_at)


async def test_a_resumable_stream_survives_a_cut(server, nursery):
    # The relay cuts the stream inside event 7.  An ordinary stream has no
    # ids, so the first turn passes whole: the text to compare with.
    relay = await Relay(server.url, cut_in=7).start(nursery)

    def drive(demo: Demo) -> dict:
        demo.knobs(tokens=60, itl=20)
        uncut = {"status": demo.turn(), "output": demo.text("#output")}
        demo.page.check("#resumable")
        cut = {"status": demo.turn(), "output": demo.text("#output"), "usage": demo.text("#usage")}
        expect(demo.page.locator("#resumed")).to_be_visible()
        cut |= {"resumed": demo.text("#resumed"), "timeline": demo.timeline(), "id": demo.generation_id()}
        return {"uncut": uncut, "cut": cut}

    seen = await run_page(relay, drive)
    uncut, cut = seen["uncut"], seen["cut"]
    assert uncut["status"].startswith("done: 60 tokens")
    assert cut["status"].startswith("done: 60 tokens") and cut["status"].endswith("finish_reason stop")
    assert cut["output"] == uncut["output"]  # no token lost, none twice
    assert '"completion_tokens":60' in cut["usage"]
    assert cut["resumed"] == "resumed after event 6"
    # The page sent the id of the last whole event; the server took it.
    assert relay.requests_to("/v1/chat/completions") == [(None, 200), (None, 200)]
    assert relay.requests_to(f"/{cut['id']}/events") == [("6", 200)]
    trace = await server.trace(cut["id"])
    assert [e["detail"] for e in trace["events"] if e["name"] == "attached"] == ["0", "6"]
    assert cut["timeline"] == drawn_as_traced(trace)


async def test_stop_cancels_a_resumable_stream(server):
    # Hanging up is what a cut looks like: the server would keep generating
    # for --resume-grace (30 s) for a resume.  Stop says POST .../cancel.
    def drive(demo: Demo) -> dict:
        demo.page.check("#resumable")
        demo.knobs(tokens=2000, itl=20)
        demo.page.click("#send")
        demo.page.wait_for_function("Number(document.getElementById('stat-tokens').textContent) > 5")
        demo.page.click("#stop")
        return {"status": demo.wait_for_trace(), "timeline": demo.timeline(), "id": demo.generation_id()}

    seen = await run_page(server, drive)
    assert seen["status"] == "stopped by you"
    name, detail, tokens = seen["timeline"][-1]
    assert (name, detail) == ("cancelled", "client_cancel") and 5 < tokens < 2000
    assert seen["timeline"] == drawn_as_traced(await server.trace(seen["id"]))
    assert not server.engine.active
