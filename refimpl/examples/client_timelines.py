"""When each client hands over each piece of an answer, and the figures of it.

Strategy
--------
Lesson 04's notebook streams one answer through every client of
``client_streams.py`` (and, through ``tests/js/clients_node.mjs``, every
Node client) against one server, and draws what the application saw: a row
per client with a tick at each piece's arrival, and each client's time to
first token beside the model's.  Every client is called twice, because the
first call in a process pays for setting the client up (connection pools,
provider tables, imports done lazily), and the second shows what it costs
once warm.

Each arrival is stamped by the ``on_token`` callback the client calls, with
``time.perf_counter()`` for the Python clients and ``performance.now()`` for
the Node ones, in seconds since the client was called; a client's own time
to first token therefore includes whatever it does before the request leaves.

:func:`run_client` is also how ``tests/test_clients.py`` calls a client from
a trio test: the sync clients in a worker thread, the asyncio one on its own
loop in a worker thread, ours on trio directly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .client_streams import CLIENTS, Ask, OnToken, Reading, read_all, with_ours

NODE_CLIENTS = Path(__file__).resolve().parents[2] / "tests" / "js" / "clients_node.mjs"


async def run_client(client: Callable[..., Any], url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    """Call one client of ``client_streams`` from trio, whatever it runs on."""
    if client is with_ours:  # trio, like this caller
        return await client(url, ask, on_token)
    if inspect.iscoroutinefunction(client):  # asyncio: its own loop, in a thread
        return await trio.to_thread.run_sync(lambda: asyncio.run(client(url, ask, on_token)))
    return await trio.to_thread.run_sync(client, url, ask, on_token)


@dataclass
class Run:
    """One call of one client: what it handed over, and when."""

    text: str = ""
    usage: dict[str, int] | None = None
    arrivals: list[float] = field(default_factory=list)  # seconds since the call, one per piece

    @property
    def ttft(self) -> float:
        return self.arrivals[0]


async def time_client(client: Callable[..., Any], url: str, ask: Ask) -> Run:
    run, start = Run(), time.perf_counter()

    def stamp(piece: str) -> bool:
        run.arrivals.append(time.perf_counter() - start)
        return True

    reading = await run_client(client, url, ask, stamp)
    run.text, run.usage = reading.text, reading.usage
    return run


async def python_timelines(url: str, ask: Ask) -> dict[str, dict[str, Run]]:
    """Every Python client, one after the other, twice: ``{name: {"first": Run,
    "second": Run}}``.  One at a time, so that no client's timing is another's."""
    runs: dict[str, dict[str, Run]] = {}
    for name, client in CLIENTS.items():
        runs[name] = {call: await time_client(client, url, ask) for call in ("first", "second")}
    return runs


def node_timelines(url: str, ask: Ask) -> dict[str, dict[str, Run]]:
    """The same for the Node clients, in one ``node`` process (packages from
    ``npm ci --prefix tests/js``, which ``make test`` runs)."""
    node = shutil.which("node")
    if node is None or not (NODE_CLIENTS.parent / "node_modules").exists():
        raise RuntimeError("needs node and `npm ci --prefix tests/js` (make test runs it)")
    js_ask = {"prompt": ask.prompt, "simulate": ask.simulate, "includeUsage": ask.include_usage}
    out = subprocess.run(
        [node, str(NODE_CLIENTS), url, json.dumps(js_ask)], capture_output=True, text=True, check=True
    ).stdout
    return {
        name: {call: Run(**fields) for call, fields in calls.items()}
        for name, calls in json.loads(out).items()
    }


# -- the figures --------------------------------------------------------------
def arrivals(runs: dict[str, Run], *, model_ttft: float, title: str = ""):
    """One row per client, a tick at each piece it handed over; the dashed
    line is the model's own time to first token (``simulate.ttft_ms``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.7 + 0.45 * len(runs)))
    names = list(runs)
    for y, name in enumerate(reversed(names)):
        ax.scatter(runs[name].arrivals, [y] * len(runs[name].arrivals), marker="|", s=160, color="tab:blue")
    ax.axvline(
        model_ttft, color="tab:red", ls="--", lw=1, label=f"the model's TTFT ({model_ttft * 1000:.0f} ms)"
    )
    ax.set_yticks(range(len(names)), list(reversed(names)))
    ax.set_xlabel("seconds since the client was called")
    ax.set_xlim(left=0)
    ax.legend(loc="upper left", fontsize="small")  # before the first token: empty
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def ttft(runs: dict[str, dict[str, Run]], *, model_ttft: float, title: str = ""):
    """Each client's time to first token, first call and second, beside the
    model's: what is left of the bar past the dashed line is the client's."""
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 0.7 + 0.5 * len(names)))
    ys = range(len(names))
    height = 0.38
    for offset, call, color in ((height / 2, "first", "tab:orange"), (-height / 2, "second", "tab:blue")):
        values = [runs[name][call].ttft * 1000 for name in reversed(names)]
        bars = ax.barh([y + offset for y in ys], values, height=height, color=color, label=f"{call} call")
        ax.bar_label(bars, fmt="%.0f ms", padding=3, fontsize="x-small")
    ax.axvline(model_ttft * 1000, color="tab:red", ls="--", lw=1, label="the model's TTFT")
    ax.set_yticks(list(ys), list(reversed(names)))
    ax.set_xlabel("time to first token, ms (client's clock)")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
