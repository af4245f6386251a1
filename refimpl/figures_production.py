"""Record and draw what lesson 14's notebook runs: the production checklist, live.

Strategy
--------
Lesson 14 checks a server the way an operator would, so its figures come
from what an operator has: the bytes on the wire, ``/metrics`` scraped while
a load runs, and the outcomes of a fault-load run.  Each figure is one call
(STYLE, "Figures"); the recording half stamps real arrivals with the
client's clock, the drawing half never invents a point.

* :func:`record_wire` posts one streaming request to any of the three
  dialects (Chat Completions, Anthropic Messages, OpenAI Responses) and keeps
  the raw bytes beside every event it parsed (``refimpl.sse``), each stamped
  with its arrival; :func:`dialect_timeline` draws the three on one time
  axis, one row each, every event named by its type, so the lesson can put
  them side by side from a real run.
* :func:`half_sent_body` is a raw socket that sends a request's headers and
  half its body, then nothing, and times the answer and the close (the
  slow-body fault of issue 14; ``hypercorn_limits.py``).
* :func:`stream_waves` drives a load in waves and keeps what each client
  saw; :func:`load_metrics` draws it beside the series
  ``examples/scrape_metrics.py`` made of ``/metrics`` meanwhile (what a
  dashboard would show, and what the clients measured), and
  :func:`fault_run` draws ``bench_faults.run_faults`` results: the outcomes
  per kind of client, and the normal streams' first token before, during
  and after.

Times are seconds since the request (or the run) started, on the client's
monotonic clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .sse import SSEParser


# -- the three dialects on the wire ----------------------------------------------
@dataclass(frozen=True, slots=True)
class WireEvent:
    at: float  # seconds since the request was sent
    name: str  # what kind of event: the SSE event name, the JSON "type", or "[DONE]"
    data: str  # the event's data, as sent
    text: str = ""  # the answer's text this event carries, if any


@dataclass
class Wire:
    """One streamed request as its client saw it: the status, the raw
    bytes in the order they came, every event with its arrival time, and
    the comment lines (``: ping``) with theirs."""

    dialect: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""
    events: list[WireEvent] = field(default_factory=list)
    comments: list[float] = field(default_factory=list)
    ended: float = 0.0

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def head(self, events: int) -> str:
        """The raw bytes of the first ``events`` events (each ends with a
        blank line), as text: what the lesson prints."""
        cut, seen = 0, 0
        while seen < events and (end := self.raw.find(b"\n\n", cut)) >= 0:
            cut, seen = end + 2, seen + (not self.raw[cut:end].startswith(b":"))
        return self.raw[:cut].decode()


#: Where each dialect streams from, and how to tell one event from another
#: and find its text.  Chat Completions sends data-only events (the kind is
#: the absence of a name, then "[DONE]"); Anthropic Messages names every
#: event (``event: content_block_delta``) and repeats the name as the JSON
#: "type"; Responses names them too, and numbers them (``sequence_number``).
PATHS = {"chat": "/v1/chat/completions", "anthropic": "/v1/messages", "responses": "/v1/responses"}


def _classify(dialect: str, event_type: str, data: str) -> WireEvent:
    if data == "[DONE]":
        return WireEvent(0.0, "[DONE]", data)
    try:
        payload = json.loads(data)
    except ValueError:
        return WireEvent(0.0, event_type, data)
    if dialect == "chat":
        if event_type == "error":
            return WireEvent(0.0, "error", data)
        choices = payload.get("choices") or []
        if not choices:
            return WireEvent(0.0, "usage", data)
        delta, finish = choices[0].get("delta", {}), choices[0].get("finish_reason")
        name = "finish" if finish else ("role" if "role" in delta else "delta")
        return WireEvent(0.0, name, data, delta.get("content") or "")
    name = payload.get("type", event_type) if isinstance(payload, dict) else event_type
    text = ""
    if dialect == "anthropic" and name == "content_block_delta":
        text = payload.get("delta", {}).get("text", "")
    elif dialect == "responses" and name == "response.output_text.delta":
        text = payload.get("delta", "")
    return WireEvent(0.0, name, data, text)


async def record_wire(
    url: str,
    dialect: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Wire:
    """POST ``body`` with ``"stream": true`` to ``dialect``'s route on the
    server at ``url`` and keep everything that came back."""
    wire, parser = Wire(dialect), SSEParser()
    start = trio.current_time()
    carry = b""
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        client.stream(
            "POST", url.rstrip("/") + PATHS[dialect], json={**body, "stream": True}, headers=headers
        ) as resp,
    ):
        wire.status, wire.headers = resp.status_code, dict(resp.headers)
        async for raw in resp.aiter_raw():
            at = trio.current_time() - start
            wire.raw += raw
            *lines, carry = (carry + raw).split(b"\n")
            wire.comments += [at for line in lines if line.startswith(b":")]
            for event in parser.feed(raw):
                seen = _classify(dialect, event.type, event.data)
                wire.events.append(WireEvent(at, seen.name, seen.data, seen.text))
    wire.ended = trio.current_time() - start
    return wire


#: Event kinds that carry the answer's text, drawn small; all others big,
#: with their names.
_TEXT_EVENTS = {"delta", "content_block_delta", "response.output_text.delta"}


def dialect_timeline(wires: dict[str, Wire], *, title: str = ""):
    """One row per dialect: every event where it arrived, the text-carrying
    ones as small dots, the others (the frame around the text) as diamonds
    named above them (events that came in one read share a label), comment
    lines (``: ping``) as grey ticks; the answer each row carried, its event
    count and its bytes beneath it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.0 + 1.9 * len(wires)))
    rows = list(reversed(wires.items()))
    for y, (_, wire) in enumerate(rows):
        texts = [e.at for e in wire.events if e.name in _TEXT_EVENTS]
        ax.scatter(texts, [y] * len(texts), s=14, color="tab:blue", zorder=3)
        for at in wire.comments:
            ax.scatter([at], [y], marker="|", s=300, color="tab:grey")
            ax.annotate(
                ": ping",
                (at, y),
                xytext=(0, -16),
                textcoords="offset points",
                fontsize=6.5,
                ha="center",
                color="tab:grey",
            )
        framing: dict[float, list[WireEvent]] = {}
        for e in wire.events:
            if e.name not in _TEXT_EVENTS:
                framing.setdefault(e.at, []).append(e)
        for at, events in framing.items():
            failed = any("error" in e.name or "failed" in e.name for e in events)
            ax.scatter([at], [y], marker="D", s=36, color="tab:red" if failed else "black", zorder=4)
            ax.annotate(
                "\n".join(e.name for e in events),
                (at, y),
                xytext=(0, 8),
                textcoords="offset points",
                fontsize=6.5,
                ha="center",
                va="bottom",
            )
        answer = wire.text if len(wire.text) < 70 else wire.text[:67] + "..."
        ax.annotate(
            f"{len(wire.events)} events, {len(wire.raw):,} bytes: {answer!r}",
            (0.01, y),
            xycoords=("axes fraction", "data"),
            xytext=(0, -30),
            textcoords="offset points",
            fontsize=7,
            color="tab:blue",
        )
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylim(-0.7, len(rows) - 0.1)
    ax.margins(x=0.08)  # room for the names of the last events
    ax.set_xlabel("seconds since the request (client)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# -- a request that stops half-way ---------------------------------------------------
@dataclass
class HalfSent:
    """What a server did with a request whose body stopped half-way."""

    status: int = 0  # 0: no answer at all
    body: bytes = b""
    answered: float | None = None  # seconds after the last byte we sent
    closed: float | None = None  # the server closed the connection; None: still open at the end


async def half_sent_body(
    url: str,
    path: str = "/v1/chat/completions",
    *,
    headers: dict[str, str] | None = None,
    wait: float = 30,
) -> HalfSent:
    """Send the headers of a ``POST`` announcing a 200-byte body (and
    ``headers``), then 20 bytes of it, then nothing; wait up to ``wait``
    seconds for the answer and for the server to close."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    result, received = HalfSent(), b""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(head.encode() + b'{"model": "refimpl-s')
        sent = trio.current_time()
        with trio.move_on_after(wait):
            while chunk := await stream.receive_some(65536):
                received += chunk
                if result.answered is None:
                    result.answered = trio.current_time() - sent
            result.closed = trio.current_time() - sent
    if received:
        status_line, _, rest = received.partition(b"\r\n")
        result.status = int(status_line.split()[1])
        result.body = rest.partition(b"\r\n\r\n")[2]
    return result


# -- a load run, as a dashboard would draw it ------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    sent: float  # seconds since the load started
    ttft: float  # seconds to the first token, as this client saw it
    tokens: int


async def stream_waves(url: str, body: dict[str, Any], waves: list[tuple[float, int]]) -> list[Sample]:
    """Streaming requests in waves: ``(seconds after the start, how many)``,
    each read to its end; what each client saw."""
    samples: list[Sample] = []
    start = trio.current_time()

    async def one(client: httpx.AsyncClient) -> None:
        sent, first, tokens, parser = trio.current_time(), None, 0, SSEParser()
        async with client.stream("POST", url + PATHS["chat"], json={**body, "stream": True}) as resp:
            async for raw in resp.aiter_raw():
                for event in parser.feed(raw):
                    if _classify("chat", event.type, event.data).text:
                        first, tokens = first or trio.current_time(), tokens + 1
        samples.append(Sample(sent - start, (first or trio.current_time()) - sent, tokens))

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client, trio.open_nursery() as nursery:
        for at, count in waves:
            await trio.sleep_until(start + at)  # the load's schedule, not a synchronisation
            for _ in range(count):
                nursery.start_soon(one, client)
    return samples


def load_metrics(series: Any, samples: list[Sample] | None = None, *, title: str = ""):
    """Three panels on one time axis, from ``scrape_metrics.series``: TTFT
    and ITL quantiles from the histograms (and, as grey dots, the TTFT each
    client measured, placed when its first token came, which is when the
    server observed it); generations running and waiting; tokens per second."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (lat, load, rate) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t = series.t

    def line(ax: Any, ys: list[float | None], **style: Any) -> None:
        # A window with no observation is a gap in the line, not a slope.
        ax.plot(t, [float("nan") if y is None else 1000 * y for y in ys], marker=".", **style)

    if samples:
        lat.scatter(
            [s.sent + s.ttft for s in samples],
            [1000 * s.ttft for s in samples],
            s=10,
            color="grey",
            alpha=0.6,
            label="TTFT each client saw (at its first token)",
        )
    line(lat, series.ttft_p50, color="tab:blue", label="TTFT p50 (histogram)")
    line(lat, series.ttft_p99, color="tab:blue", ls="--", label="TTFT p99 (histogram)")
    line(lat, series.itl_p50, color="tab:orange", label="ITL p50 (histogram)")
    line(lat, series.itl_p99, color="tab:orange", ls="--", label="ITL p99 (histogram)")
    lat.set_yscale("log")
    lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lat.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    lat.set_ylabel("ms")
    lat.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    load.step(t, series.active, where="post", label="refimpl_active_generations")
    load.step(t, series.queued, where="post", label="refimpl_queued_generations")
    load.set_ylabel("generations")
    load.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    rate.plot(t, series.tokens_per_s, marker=".", color="tab:green", label="rate(refimpl_tokens_total)")
    rate.set_ylabel("tokens / s")
    rate.set_xlabel("seconds since the first scrape")
    rate.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    for ax in (lat, load, rate):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- a fault-load run ------------------------------------------------------------------------
def fault_run(runs: dict[str, dict[str, Any]], *, title: str = ""):
    """Left: what each kind of client got in the first run of ``runs`` (a
    ``bench_faults.run_faults`` result), one bar per kind, a segment per
    outcome, red for any outcome not documented for that kind.  Right: the
    normal streams' first-token delay before, during and after each run."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from .bench_fault_clients import expected

    first = next(iter(runs.values()))
    fig, (bars, ttft) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    kinds = list(first["outcomes"])
    # Any colour but red, which marks an outcome not documented for its kind.
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (6, 7)]
    colors: dict[str, Any] = {}
    widest = max(sum(first["outcomes"][k].values()) for k in kinds) or 1
    for y, kind in enumerate(reversed(kinds)):
        left = 0
        for outcome, count in first["outcomes"][kind].items():
            ok = expected(kind, outcome)
            color = colors.setdefault(outcome, palette[len(colors) % len(palette)]) if ok else "tab:red"
            bars.barh(y, count, left=left, color=color, edgecolor="white")
            room = int(55 * count / widest)  # characters that fit in the segment
            if room >= 4:
                label = outcome.removeprefix("HTTP ")
                bars.annotate(
                    label if len(label) <= room else label[: room - 1] + "…",
                    (left + count / 2, y),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                )
            left += count
    bars.set_yticks(range(len(kinds)), list(reversed(kinds)))
    bars.set_xlabel("outcomes in the run (count)")
    bars.set_title(f"{next(iter(runs))}: what each kind of client got", fontsize="medium")
    bars.grid(axis="x", alpha=0.3)
    phases = ("before", "during", "after")
    width = 0.8 / len(runs)
    for i, (label, result) in enumerate(runs.items()):
        stats = result["first_token_ms"]
        xs = [p + i * width for p in range(len(phases))]
        ttft.bar(xs, [stats[p]["p50_ms"] for p in phases], width, label=f"{label}: p50")
        ttft.scatter(xs, [stats[p]["p99_ms"] for p in phases], marker="_", s=300, color="black", zorder=3)
    ttft.scatter([], [], marker="_", s=300, color="black", label="p99")
    ttft.set_xticks([p + width * (len(runs) - 1) / 2 for p in range(len(phases))], phases)
    ttft.set_yscale("log")
    ttft.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ttft.set_ylabel("normal streams' first token, ms")
    ttft.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
    ttft.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
