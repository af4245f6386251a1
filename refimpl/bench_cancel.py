"""``refimpl bench cancel``: how fast a client's leaving stops the model.

Strategy
--------
Lesson 09 ("Cancellation") promises that when a client hangs up, the
generation ends at once: the writer's response generator is cancelled, and
its ``finally`` records ``cancelled(client_disconnect)`` in the trace
(``protocols/sse_chat.py``).  This bench measures "at once".  It starts a
refimpl server *in-process* (``create_app`` + ``serve`` on ``127.0.0.1:0``,
in the same ``trio.run`` as the client), then, one request at a time, N
times per scenario:

1. POST a streamed chat whose model is slow enough that it cannot finish
   first, and read the body until the moment the scenario wants;
2. note ``trio.current_time()`` and close the connection mid-body (httpx
   closes the socket of a response that was not read to the end);
3. wait for the generation to end (``Generation.ended``, found through
   ``server.engine.get(id)``) and read its trace.

The latency is ``cancelled.at - left_at``.  Both are stamps of the one loop
clock, so no clocks are compared; what lies between them is the client's
own ``aclose`` (the stamp is taken before it), the kernel's loopback,
hypercorn hearing the EOF, Quart cancelling the response generator, and
the ``finally`` that ends the generation.  Client and server share one
thread, so any time the client spends is time the server waits: the figure
is an upper bound for the server's part.  The bench also counts the tokens
the client never got: the trace's count at ``cancelled`` minus the content
tokens the client had received (a token already on its way when the client
left counts too).  One more thing stops the whole process: Python's full
(generation 2) garbage collection, 40-60 ms on a 2-CPU machine.  It lands
on whichever disconnect is being timed, so each latency that spans one is
marked (``full_gc``) and the table says what the max is without them.

Two scenarios:

``mid-stream``              a token every 20 ms, 1,000 of them; the client
                            leaves after its first content token.
``before the first token``  a 60 s TTFT; the client leaves after the first
                            event (the role chunk), while the writer waits
                            for the model's first token.
``while queued``            the one slot (``max_active`` 1 for this part) is
                            held by another generation, so the request waits
                            in the admission queue (lesson 09, "the queue");
                            the client leaves after the role chunk, before
                            the model ever started.

Every disconnect must end as ``cancelled(client_disconnect)``; another
ending (or none within 10 s) is reported as what it was, not as a latency.
Everything stays on loopback and the count is bounded.  The report is a
table on stdout and, with ``--json PATH``, a file with the configuration,
the machine, every sample and the summary.  The issue's goal: p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from .backend import ModelRequest, Simulate
from .bench import environment, ms, percentile
from .config import DEFAULT_MODEL, Config
from .sse import SSEParser

if TYPE_CHECKING:
    from .engine import Engine

QUEUED = "while queued"
#: Scenario name -> (the model's "simulate" knobs, content tokens to read before leaving).
SCENARIOS: dict[str, tuple[dict[str, Any], int]] = {
    "mid-stream": ({"ttft_ms": 0, "itl_ms": 20, "tokens": 1000}, 1),
    "before the first token": ({"ttft_ms": 60_000, "itl_ms": 20, "tokens": 1000}, 0),
    QUEUED: ({"ttft_ms": 0, "itl_ms": 20, "tokens": 1000}, 0),
}
MAX_COUNT = 100_000
WARMUP = 5  # disconnects before the measured ones: imports, caches, first connections
ENDED_WITHIN = 10.0  # seconds a generation may take to end before we say it did not
GOAL_P99_MS = 5.0
EXPECTED = "cancelled(client_disconnect)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cancel",
        aliases=["disconnect"],  # what the client does, as the issue names its scenarios
        help="measure client disconnect -> cancelled latency (lesson 09)",
    )
    p.add_argument("--count", type=int, default=1000, help=f"disconnects per scenario (1-{MAX_COUNT:,})")
    p.add_argument("--json", type=Path, default=None, help="also save the results to this file")
    p.set_defaults(run=run)


# -- one client that leaves ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Departure:
    id: str  # the generation's id, from the chunks
    received: int  # content tokens the client had received when it left
    at: float  # trio.current_time() just before it closed the connection


async def leave_after(client: httpx.AsyncClient, url: str, body: dict[str, Any], tokens: int) -> Departure:
    """POST a streamed chat to ``url``, read until ``tokens`` content tokens
    have come (0: until the first event), then close the connection mid-body."""
    parser, gen_id, received = SSEParser(), None, 0
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        async for raw in resp.aiter_raw():
            for event in parser.feed(raw):
                if event.data == "[DONE]":
                    raise RuntimeError("the stream ended before the client meant to leave")
                chunk = json.loads(event.data)
                gen_id = chunk["id"]
                received += bool(chunk["choices"][0]["delta"].get("content"))
            if gen_id is not None and received >= tokens:
                left_at = trio.current_time()
                await resp.aclose()  # the body is not finished: httpx closes the socket
                return Departure(gen_id, received, left_at)
    raise RuntimeError("the stream ended before the client meant to leave")


# -- the scenarios ---------------------------------------------------------------
class FullCollections:
    """When the interpreter ran a full (generation 2) garbage collection.  One
    stops the whole process for tens of ms and lands on whichever disconnect
    is being timed; the bench marks those samples instead of guessing."""

    def __init__(self, clock: trio.abc.Clock) -> None:
        self._clock = clock  # the loop's clock, readable from any thread
        self.started: list[float] = []

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            self.started.append(self._clock.current_time())

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.started if start <= t <= end)


@contextmanager
def holding_the_only_slot(engine: Engine) -> Iterator[None]:
    """One slot, taken by a generation that will not finish: every request
    made meanwhile waits in the admission queue."""
    request = ModelRequest(messages=(("user", "hold the slot"),), simulate=Simulate(ttft_ms=3_600_000))
    blocker, saved = engine.start(request, "bench"), engine.max_active
    engine.max_active = 1
    try:
        yield
    finally:
        engine.max_active = saved
        blocker.cancel("client_disconnect")


async def disconnect_once(
    server_url: str, engine: Engine, client: httpx.AsyncClient, gcs: FullCollections, scenario: str
) -> dict:
    """One request that the client leaves; what the trace says happened."""
    simulate, read = SCENARIOS[scenario]
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "simulate": simulate}
    left = await leave_after(client, server_url + "/v1/chat/completions", body, read)
    gen = engine.get(left.id)
    with trio.move_on_after(ENDED_WITHIN):
        await gen.ended.wait()
    end = gen.trace.events[-1]
    outcome = f"{end.name}({end.detail})" if gen.finished else "still running"
    sample = {"outcome": outcome, "received": left.received, "tokens_at_end": end.tokens}
    if outcome == EXPECTED:
        sample["latency_ms"] = ms(end.at - left.at)
        sample["full_gc"] = gcs.between(left.at, end.at)  # collections inside the latency
    return sample


def summarize(samples: list[dict]) -> dict[str, Any]:
    cancelled = [s for s in samples if s["outcome"] == EXPECTED]
    latencies = [s["latency_ms"] / 1000 for s in cancelled]
    after = [s["tokens_at_end"] - s["received"] for s in cancelled]
    without_gc = [s["latency_ms"] / 1000 for s in cancelled if not s["full_gc"]]
    return {
        "disconnects": len(samples),
        "outcomes": dict(Counter(s["outcome"] for s in samples)),
        "latency_ms_p50": ms(percentile(latencies, 50)),
        "latency_ms_p99": ms(percentile(latencies, 99)),
        "latency_ms_max": ms(max(latencies, default=None)),
        "tokens_after_leaving_max": max(after, default=None),
        "tokens_after_leaving_total": sum(after),
        "latencies_with_full_gc": len(cancelled) - len(without_gc),
        "latency_ms_max_without_full_gc": ms(max(without_gc, default=None)),
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    def cell(v: float | None) -> str:
        return f"{'-' if v is None else format(v, '.3f'):>10}"

    rows = [f"{'':24}{'cancelled':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'tokens after, max':>20}"]
    notes = []
    for name, s in summary.items():
        ok = f"{s['outcomes'].get(EXPECTED, 0)}/{s['disconnects']}"
        latency = "".join(cell(s[f"latency_ms_{q}"]) for q in ("p50", "p99", "max"))
        after = s["tokens_after_leaving_max"]
        rows.append(f"{name:24}{ok:>12}{latency}{'-' if after is None else after:>20}")
        if s["latencies_with_full_gc"]:
            notes.append(
                f"{name}: {s['latencies_with_full_gc']} latency(ies) spanned a full garbage"
                f" collection; max without: {cell(s['latency_ms_max_without_full_gc']).strip()} ms"
            )
    return "\n".join(rows + notes)


async def run(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_COUNT:
        raise SystemExit(f"need 1 <= --count <= {MAX_COUNT:,}")
    from .app import create_app, serve  # the server's imports, only when we run one

    app = create_app(Config())  # every request brings its own "simulate"
    engine = app.extensions["refimpl.engine"]
    samples: dict[str, list[dict]] = {name: [] for name in SCENARIOS}
    gcs = FullCollections(trio.lowlevel.current_clock())
    gc.callbacks.append(gcs)
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, app, "127.0.0.1", 0))
            async with httpx.AsyncClient(timeout=httpx.Timeout(ENDED_WITHIN)) as client:
                once = partial(disconnect_once, url, engine, client, gcs)
                for _ in range(WARMUP):
                    await once("mid-stream")
                for name, out in samples.items():
                    with holding_the_only_slot(engine) if name == QUEUED else nullcontext():
                        for _ in range(args.count):
                            out.append(await once(name))
            nursery.cancel_scope.cancel()
    finally:
        gc.callbacks.remove(gcs)
    summary = {name: summarize(out) for name, out in samples.items()}
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": f"refimpl bench cancel --count {args.count}",
        "config": {
            "count": args.count,
            "warmup": WARMUP,
            "scenarios": {
                name: {"simulate": sim, "read_tokens": read} for name, (sim, read) in SCENARIOS.items()
            },
            "goal_p99_ms": GOAL_P99_MS,
        },
        "machine": environment(),
        "summary": summary,
        "samples": samples,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.count} disconnects per scenario, in-process server on loopback:")
    print(table(summary))
    p99 = [s["latency_ms_p99"] for s in summary.values() if s["latency_ms_p99"] is not None]
    print(f"\ngoal: p99 <= {GOAL_P99_MS:g} ms -- {'met' if p99 and max(p99) <= GOAL_P99_MS else 'NOT met'}")
    if args.json is not None:
        print(f"results: {args.json}")
    missed = sum(s["disconnects"] - s["outcomes"].get(EXPECTED, 0) for s in summary.values())
    return 1 if missed else 0
