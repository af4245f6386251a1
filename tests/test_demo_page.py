"""The demo page in real headless Chromium: Send streams, Stop cancels.

The page is the first thing a new user sees after ``make run``.  This drives
it the way they do: click **Send**, watch tokens land, click **Stop**, and the
trace panel shows the server's ``cancelled(client_disconnect)``.  Chromium is
Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it), driven by
Playwright's sync API in a worker thread (the server shares this test's loop).
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def drive(url: str) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        text = lambda sel: page.text_content(sel) or ""  # noqa: E731
        # 1. a long answer, stopped half-way
        page.fill("#ttft", "0"), page.fill("#itl", "20"), page.fill("#tokens", "2000")
        page.click("#send")
        page.wait_for_function("document.getElementById('output').textContent.length > 40")
        page.click("#stop")
        page.wait_for_function("document.getElementById('trace').textContent.includes('cancelled')")
        stopped = {"status": text("#status"), "trace": text("#trace")}
        # 2. a short answer to the end
        page.fill("#itl", "0"), page.fill("#tokens", "12")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        page.wait_for_function("document.getElementById('trace').textContent.includes('done(stop)')")
        done = {"status": text("#status"), "usage": text("#usage"), "output": text("#output")}
        browser.close()
    return {"stopped": stopped, "done": done}


async def test_send_and_stop_in_chromium(server):
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat before the test)
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    with trio.fail_after(60):
        seen = await trio.to_thread.run_sync(drive, server.url, abandon_on_cancel=True)
    assert seen["stopped"]["status"] == "stopped by you"
    assert "cancelled(client_disconnect)" in seen["stopped"]["trace"]
    assert seen["done"]["status"].startswith("done: TTFT") and "12 tokens" in seen["done"]["status"]
    assert '"completion_tokens":12' in seen["done"]["usage"]
    assert len(seen["done"]["output"].split()) >= 5
    assert not server.engine.active
