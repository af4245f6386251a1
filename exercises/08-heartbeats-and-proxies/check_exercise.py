"""The check of exercise 08: pings counted, and an idle timeout they reset.

A model that thinks for 1.1 s, then writes 3 tokens 0.6 s apart, behind a
server that heartbeats every 0.25 s: ``refimpl_heartbeats_total`` on
``/metrics`` counts the pings the server sent.  Then the same model behind a server with the
default 15 s heartbeat, where nothing arrives for 1.1 s.  All on
trio's virtual clock.
"""

from __future__ import annotations

import httpx
import pytest
import trio
from conftest import chat_body

from refimpl.model import simulated_text

SLOW = {"ttft_ms": 1100, "itl_ms": 600, "tokens": 3}
TEXT = "".join(simulated_text("Hello", 0)[:3])
TIMEOUTS = (TimeoutError, trio.TooSlowError, httpx.TimeoutException)


async def pings_sent(client: httpx.AsyncClient, url: str) -> int:
    """The server's count of heartbeats sent, from ``GET /metrics``."""
    metrics = (await client.get(f"{url}/metrics")).text
    (line,) = [line for line in metrics.splitlines() if line.startswith("refimpl_heartbeats_total ")]
    return int(float(line.split()[1]))


async def test_pings_are_counted_and_keep_the_stream_alive(
    exercise, start_server, client, autojump_clock, observe
):
    server = await start_server(heartbeat=0.25)
    with trio.fail_after(30):
        try:
            heard = await exercise.listen(client, server.url, chat_body(simulate=SLOW), idle_timeout=0.5)
        except TIMEOUTS as err:
            pytest.fail(
                f"timed out ({type(err).__name__}) on a stream that pinged every 0.25 s", pytrace=False
            )
    sent = await pings_sent(client, server.url)
    observe("pings counted (heartbeat 0.25 s, ttft 1.1 s, itl 0.6 s, 3 tokens)", heard.pings)
    assert heard.text == TEXT
    assert heard.pings == sent, f"you counted {heard.pings} pings; the server sent {sent}"


async def test_silence_times_out(exercise, start_server, client, autojump_clock, observe):
    server = await start_server()  # heartbeat every 15 s: the model's 1.1 s of thought is silent
    start = trio.current_time()
    with trio.fail_after(30), pytest.raises(TIMEOUTS) as raised:
        await exercise.listen(client, server.url, chat_body(simulate=SLOW), idle_timeout=0.5)
    waited = trio.current_time() - start
    observe("silent for 1.1 s, idle_timeout 0.5 s: gave up after", f"{waited:.3f} s ({raised.type.__name__})")
    assert waited == pytest.approx(0.5, abs=0.01), "give up after idle_timeout seconds of silence"
