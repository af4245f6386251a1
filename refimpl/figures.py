"""Record a stream as the client sees it, and draw it: the notebooks' figures.

Strategy
--------
A lesson's figure must come from a real run, not be drawn by hand (STYLE,
"Figures"), and a notebook cell should stay one call long.  So this module
has two halves:

* :func:`record` streams one request with httpx and stamps every arrival with
  the client's clock: each content chunk, each heartbeat comment, the error
  event, ``[DONE]`` -- and notices when the body ends without either (a cut
  stream).  Comments are invisible to an SSE parser by design (WHATWG HTML
  §9.2.6 ignores them), so the recorder splits lines itself to see them,
  and uses :class:`~refimpl.sse.SSEParser` for the events.
* :func:`timeline` draws recordings, one row each, beside the server's trace
  of the same generation (``GET /v1/debug/generations/{id}``): what the
  client saw on top, what the server did beneath, on one time axis;
  :func:`arrivals` draws tokens received against time, one line each, and
  :func:`made_and_read` sets beside each the tokens the model made, from
  the trace (what a client that left cost: lesson 09).
  Lesson 10 adds :func:`flow_runs`, the tokens made beside the tokens read
  by the slow readers of ``examples/slow_reader.py`` with the trace's
  pauses, and :func:`memory`, the server's RSS from ``refimpl bench
  backpressure``.

The notebooks of lessons 00-03 and 13 add: :func:`visible_text`, the
answer a reader can see against time (a full response against a streamed
one); :func:`trace_strip`, traces as a Gantt-like strip of their phases,
with what the client received above each; :func:`read_cuts`, where the
network cut a body's bytes, against where its events end.  The figures of
``refimpl bench`` are in ``bench_figures.py``.

Times are seconds since the request was sent (client) or since the trace's
``accepted`` event (server); both clocks are monotonic.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .sse import SSEParser


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # seconds since the request was sent
    kind: str  # "token", "ping", "error", "done", "other"
    text: str = ""
    read: int = 0  # which read from the socket delivered it (0, 1, ...)


@dataclass
class Recording:
    id: str = ""  # the generation id (X-Request-Id)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    started: float = 0.0  # trio.current_time() when the request was sent
    arrivals: list[Arrival] = field(default_factory=list)
    # How the body ended: "done" ([DONE]), "error" (an error event), "cut"
    # (neither, or the connection broke: then even after [DONE], as when a
    # proxy waits for a close that never comes), or "refused" (a 4xx/5xx).
    ending: str = ""
    ended: float = 0.0  # seconds since the request: the body ended, or broke
    error: dict[str, Any] | None = None

    def times(self, kind: str) -> list[float]:
        return [a.at for a in self.arrivals if a.kind == kind]

    def reads(self, kind: str = "token") -> set[int]:
        """The socket reads that delivered arrivals of this kind: one per
        event when the stream flows, a single one when something held it."""
        return {a.read for a in self.arrivals if a.kind == kind}

    @property
    def text(self) -> str:
        return "".join(a.text for a in self.arrivals if a.kind == "token")


# region: record
async def record(
    url: str, body: dict[str, Any], *, headers: dict[str, str] | None = None, timeout: float = 60
) -> Recording:
    """POST ``body`` as a streaming chat request to the server (or proxy) at
    ``url`` and stamp every arrival.  Never raises for what the server or a
    proxy does: a refusal, a cut or a timeout is in the :class:`Recording`."""
    rec, parser, carry = Recording(), SSEParser(), b""
    rec.started = start = trio.current_time()
    reads = 0

    def stamp(kind: str, text: str = "") -> None:
        rec.arrivals.append(Arrival(trio.current_time() - start, kind, text, reads))

    endpoint = url.rstrip("/") + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=timeout) as client:
        try:
            async with client.stream(
                "POST", endpoint, json={**body, "stream": True}, headers=headers
            ) as resp:
                rec.status, rec.headers = resp.status_code, dict(resp.headers)
                rec.id = resp.headers.get("x-request-id", "")
                if resp.status_code != 200:  # ours (JSON), or a proxy's page (HTML)
                    rec.ending, rec.error = "refused", _error_of(await resp.aread())
                else:
                    async for raw in resp.aiter_bytes():  # decoded: a proxy's gzip undone
                        *lines, carry = (carry + raw).split(b"\n")
                        for _ in (line for line in lines if line.startswith(b":")):
                            stamp("ping")
                        for event in parser.feed(raw):
                            _arrived(rec, event, stamp)
                        reads += 1
        except httpx.HTTPError as err:  # cut by a proxy, or a read timeout
            rec.ending, rec.error = "cut", {"message": f"{type(err).__name__}: {err}"}
    rec.ending = rec.ending or "cut"
    rec.ended = trio.current_time() - start
    return rec


def _error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI error object of a refusal, or the start of whatever else
    the body is (a proxy's HTML 502 page)."""
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return {"message": body[:200].decode("utf-8", "replace")}


def _arrived(rec: Recording, event: Any, stamp: Any) -> None:
    if event.data == "[DONE]":
        rec.ending = "done"
        return stamp("done")
    payload = json.loads(event.data)
    if event.type == "error":
        rec.ending, rec.error = "error", payload["error"]
        return stamp("error", payload["error"].get("code") or "")
    choices = payload.get("choices") or [{}]
    content = choices[0].get("delta", {}).get("content")
    stamp("token" if content else "other", content or "")


# endregion: record

# How each kind of mark is drawn, client side and server side.
_CLIENT = {
    "token": ("|", "tab:blue"),
    "ping": ("o", "tab:green"),
    "error": ("X", "tab:red"),
    "done": ("s", "black"),
}
_SERVER = {
    "accepted": ("^", "grey"),
    "first_token": ("|", "tab:blue"),
    "heartbeat": ("o", "tab:green"),
    "queued": ("v", "tab:purple"),
    "admitted": ("D", "tab:purple"),
    "error": ("X", "tab:red"),
    "cancelled": ("X", "tab:orange"),
    "done": ("s", "black"),
}


def timeline(
    runs: dict[str, Recording],
    traces: dict[str, dict[str, Any]] | None = None,
    *,
    title: str = "",
    limit: float | None = None,
):
    """One row per recording (what the client saw) and, beneath it, its
    server trace (what the server did), when ``traces`` has it.

    Returns the matplotlib Figure; in a notebook it shows inline.
    """
    import matplotlib.pyplot as plt  # only the notebooks need matplotlib

    traces = traces or {}
    rows = [
        (label, side)
        for label in runs
        for side in ("client", "server")
        if side == "client" or label in traces
    ]
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.55 * len(rows)))
    for y, (label, side) in enumerate(reversed(rows)):
        marks = _client_marks(runs[label]) if side == "client" else _server_marks(traces[label])
        for kind, xs in marks.items():
            marker, color = (_CLIENT if side == "client" else _SERVER)[kind]
            ax.scatter(xs, [y] * len(xs), marker=marker, color=color, s=90, label=f"{side}: {kind}")
        if side == "client" and runs[label].ending == "cut":
            ax.scatter([runs[label].ended], [y], marker="$/$", color="tab:red", s=160, label="client: cut")
            ax.annotate(
                "cut", (runs[label].ended, y), textcoords="offset points", xytext=(6, 6), color="tab:red"
            )
    ax.set_yticks(range(len(rows)), [f"{label} ({side})" for label, side in reversed(rows)])
    ax.set_xlabel("seconds since the request")
    if limit is not None:
        ax.set_xlim(-0.05 * limit, limit)
    handles = {h.get_label(): h for h in ax.collections}
    ax.legend(handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def arrivals(runs: dict[str, Recording], *, title: str = ""):
    """Tokens received so far against time, one line per recording: a
    stream that flows is a staircase, one that something held is a cliff."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for label, rec in runs.items():
        times = rec.times("token")
        ax.step([0, *times], range(len(times) + 1), where="post", label=label)
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("tokens received")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def made_and_read(runs: dict[str, Recording], traces: dict[str, dict[str, Any]], *, title: str = ""):
    """One panel per recording: tokens the client received (a staircase, from
    its own stamps) and tokens the model had made (dashed, through the trace's
    events, each of which carries the count at that moment; between two
    events the line assumes the model's steady pace).  Where the dashed line
    climbs on alone, the model worked for nobody."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.5 * len(runs), 3.2), sharex=True, sharey=True, squeeze=False
    )
    axes = axes[0]
    last = {label: trace["events"][-1] for label, trace in traces.items()}
    most = max(event["tokens"] for event in last.values())
    latest = max(event["at"] - traces[label]["events"][0]["at"] for label, event in last.items())
    for ax, (label, rec) in zip(axes, runs.items(), strict=True):
        times = rec.times("token")
        ax.step([0, *times], range(len(times) + 1), where="post", color="tab:blue", label="received (client)")
        events = traces[label]["events"]
        zero, end = events[0]["at"], events[-1]
        ax.plot(
            [e["at"] - zero for e in events],
            [e["tokens"] for e in events],
            "--o",
            color="tab:orange",
            label="made (trace)",
        )
        ending = end["name"] + (f"({end['detail']})" if end["name"] == "cancelled" else "")
        ax.annotate(
            f"{ending}\n{end['tokens']} made, {len(times)} received",
            (end["at"] - zero, end["tokens"]),
            textcoords="offset points",
            xytext=(6, 6) if end["at"] - zero < latest / 2 else (-6, 6),
            ha="left" if end["at"] - zero < latest / 2 else "right",
            fontsize="small",
        )
        ax.set_title(label)
        ax.set_xlabel("seconds since the request")
        ax.set_ylim(0, 1.3 * most)  # room for the note above the last point
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tokens")
    axes[0].legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _client_marks(rec: Recording) -> dict[str, list[float]]:
    return {kind: xs for kind in _CLIENT if (xs := rec.times(kind))}


def _server_marks(trace: dict[str, Any]) -> dict[str, list[float]]:
    """Trace events by name, relative to ``accepted`` (the trace records the
    first token, not each one: per-token stamps are the client's row)."""
    events = trace["events"]
    zero = events[0]["at"]
    marks: dict[str, list[float]] = {}
    for event in events:
        if event["name"] in _SERVER:
            marks.setdefault(event["name"], []).append(event["at"] - zero)
    return marks


def flow_runs(readings: dict[str, Any], traces: dict[str, dict[str, Any]], *, title: str = ""):
    """One panel per slow reader (a ``refimpl.examples.slow_reader.Reading``),
    on the client's clock: the tokens the model had made (sampled from the
    server) above the tokens the client had received; a dotted line where the
    reader slowed down; the trace's pauses shaded, each from ``paused`` to
    the next ``resumed`` or the end.  The trace runs on the server's clock
    (in a notebook, another thread's trio loop), so it is placed by its
    ``accepted``, taken to be the moment the request was sent (on loopback,
    a millisecond or two before)."""
    import matplotlib.pyplot as plt

    cols = len(readings) if len(readings) <= 3 else 2
    rows = -(-len(readings) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols + 0.6, 3.4 * rows), sharex=True, sharey=True, squeeze=False
    )
    shade = {"write_blocked": "tab:grey", "buffer_full": "tab:orange"}
    for ax, (label, reading) in zip(axes.flat, readings.items(), strict=False):
        events = traces[label]["events"]
        shift = -events[0]["at"]  # server clock -> client clock: accepted at 0
        made_t, made_n = zip(*reading.made, strict=True)
        ax.plot(made_t, made_n, color="tab:orange", label="made (server)")
        got_t, got_n = zip(*reading.received, strict=True)
        got_t, got_n = [0, *got_t, reading.ended], [0, *got_n, got_n[-1]]  # held until it ended
        ax.step(got_t, got_n, where="post", color="tab:blue", label="received (client)")
        if reading.slowed_at is not None:
            ax.axvline(reading.slowed_at, color="black", linestyle=":", label="the reader slows down")
        for i, event in enumerate(events):
            if event["name"] == "paused":
                end = next((e for e in events[i + 1 :] if e["name"] != "heartbeat"), events[-1])
                ax.axvspan(
                    event["at"] + shift,
                    end["at"] + shift,
                    color=shade.get(event["detail"], "tab:grey"),
                    alpha=0.15,
                    label=f"paused ({event['detail']})",
                )
        last = events[-1]
        if last["detail"] != "client_disconnect":  # (that one is the reader hanging up)
            ax.scatter([last["at"] + shift], [last["tokens"]], marker="X", color="tab:red", zorder=3)
            ax.annotate(
                f"{last['name']}({last['detail']})",
                (last["at"] + shift, last["tokens"]),
                textcoords="offset points",
                xytext=(-6, 6) if last["tokens"] < 0.8 * ax.get_ylim()[1] else (-8, -14),
                ha="right" if last["at"] + shift > reading.ended / 2 else "left",
                fontsize="small",
                color="tab:red",
            )
        if reading.ending == "error":
            ax.scatter([reading.ended], [reading.tokens], marker="X", color="tab:blue", zorder=3)
            ax.annotate(
                f"client: error {reading.error.get('code')}",
                (reading.ended, reading.tokens),
                textcoords="offset points",
                xytext=(0, -16),
                ha="right",
                fontsize="small",
                color="tab:blue",
            )
        ax.set_title(label)
        ax.grid(alpha=0.3)
        handles = {h.get_label(): h for h in [*ax.lines, *ax.patches]}
        ax.legend(handles.values(), handles.keys(), loc="upper left", fontsize="x-small")
    for ax in axes[:, 0]:
        ax.set_ylabel("tokens")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the request (client)")
    for ax in axes.flat[len(readings) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def memory(cases: list[Any], *, title: str = ""):
    """Server RSS growth while a client reads nothing, one panel per protocol
    and one line per policy (``refimpl.bench_backpressure.Case``s), under
    each case's limit (dashed): what flat memory looks like."""
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(case.protocol for case in cases))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.2), sharey=True, squeeze=False)
    names = {"sse": "SSE (HTTP/1.1)", "ws": "WebSocket"}
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for case in (c for c in cases if c.protocol == protocol):
            (line,) = ax.plot(
                [0, *(t for t, _ in case.samples)],
                [0, *(kib - case.baseline_kib for _, kib in case.samples)],
                marker=".",
                label=f"{case.policy}: +{case.growth_kib:,} KiB, {case.tokens_made:,} tokens made",
            )
            ax.axhline(case.limit_kib, color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_title(names.get(protocol, protocol))
        ax.set_xlabel("seconds since the client stopped reading")
        ax.legend(loc="center right", fontsize="x-small")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("RSS growth, KiB (dashed: limit)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def visible_text(timings: dict[str, Any], *, title: str = ""):
    """Characters of the answer a reader can see against time, one line per
    ``refimpl.examples.timing.Timing``: a streamed answer is a staircase
    from its TTFT, a full one a single cliff at its end."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for label, timing in timings.items():
        times = [at for at, _ in timing.arrivals]
        seen = [0]
        for _, text in timing.arrivals:
            seen.append(seen[-1] + len(text))
        (line,) = ax.step([0, *times, timing.e2e], [*seen, seen[-1]], where="post", label=label)
        ax.scatter([timing.ttft], [seen[1]], color=line.get_color(), zorder=3)
        ax.annotate(
            f"TTFT {timing.ttft:.2f} s",
            (timing.ttft, seen[1]),
            textcoords="offset points",
            xytext=(-8, 4),
            ha="right",
            color=line.get_color(),
            fontsize="small",
        )
    ax.set_ylim(top=1.2 * ax.get_ylim()[1])  # room for the notes above the last step
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("characters the reader can see")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# How trace_strip draws a generation's phases, and the client's marks above them.
_PHASES = {
    "queued": "tab:purple",
    "waiting for the first token": "lightgrey",
    "generating": "tab:blue",
    "paused": "tab:orange",
}
_ENDS = {"done": ("s", "black"), "error": ("X", "tab:red"), "cancelled": ("X", "tab:orange")}
_STRIP_CLIENT = {
    "token": ("|", "tab:blue"),
    "ping": ("o", "tab:green"),
    "done": ("s", "black"),
    "error": ("X", "tab:red"),
    "cancelled": ("X", "tab:orange"),
    "cancel sent": ("^", "tab:orange"),
}
_SENT = {"cancel sent"}  # what the client sent: drawn below its strip, not above


def _phases(events: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(phase, start, end) spans of one trace, in seconds since ``accepted``."""
    zero, spans = events[0]["at"], []
    at = {e["name"]: e["at"] - zero for e in reversed(events)}  # the first of each name
    end = events[-1]["at"] - zero
    model_from = at.get("admitted", 0.0)
    if "queued" in at:
        spans.append(("queued", at["queued"], at.get("admitted", end)))
    if "admitted" in at or "queued" not in at:
        spans.append(("waiting for the first token", model_from, at.get("first_token", end)))
    if "first_token" in at:
        spans.append(("generating", at["first_token"], end))
    for i, event in enumerate(events):
        if event["name"] == "paused":
            until = next((e for e in events[i + 1 :] if e["name"] != "heartbeat"), events[-1])
            spans.append(("paused", event["at"] - zero, until["at"] - zero))
    return spans


def trace_strip(
    traces: dict[str, dict[str, Any]],
    runs: dict[str, Recording] | None = None,
    *,
    title: str = "",
):
    """One row per trace, as a Gantt-like strip: what the generation was
    doing (queued, waiting for its first token, generating, paused) from
    ``accepted`` to its end, the end marked and named with the tokens made;
    heartbeats as dots.  Above a strip, when ``runs`` has its label, what the
    client received (a tick per token, and its last message), and below it
    what the client sent (a WebSocket ``cancel sent``), on the client's
    clock.  The two clocks are lined up at ``accepted``: a
    recording whose first arrival is the role chunk (kind ``other``, which
    the server writes the moment it accepted the request) is shifted to put
    that arrival there; any other is taken to have sent its request at that
    moment (on loopback a millisecond or two before), as :func:`flow_runs`
    does."""
    import matplotlib.pyplot as plt

    runs, legend = runs or {}, {}
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.75 * len(traces)))
    latest = max(t["events"][-1]["at"] - t["events"][0]["at"] for t in traces.values())
    for y, (label, trace) in enumerate(reversed(traces.items())):
        events = trace["events"]
        zero, last = events[0]["at"], events[-1]
        for phase, start, end in _phases(events):
            width = max(end - start, latest / 400)  # an instant still shows
            legend[phase] = ax.barh(y, width, left=start, height=0.34, color=_PHASES[phase])
        beats = [e["at"] - zero for e in events if e["name"] == "heartbeat"]
        if beats:
            legend["heartbeat"] = ax.scatter(
                beats, [y] * len(beats), marker="o", color="tab:green", s=30, zorder=3
            )
        if last["name"] in _ENDS:
            marker, color = _ENDS[last["name"]]
            legend[last["name"]] = ax.scatter(
                [last["at"] - zero], [y], marker=marker, color=color, s=70, zorder=3
            )
            ax.annotate(
                f"{event_name(last)}, {last['tokens']} tokens",
                (last["at"] - zero, y),
                textcoords="offset points",
                xytext=(8, -4),
                fontsize="small",
            )
        for kind, xs in _client_kinds(runs.get(label)).items():
            marker, color = _STRIP_CLIENT[kind]
            size, above = (40 if kind == "token" else 50), kind not in _SENT
            ys = [y + (0.32 if above else -0.32)] * len(xs)
            legend[f"client: {kind}"] = ax.scatter(xs, ys, marker=marker, color=color, s=size)
    ax.set_yticks(range(len(traces)), list(reversed(traces)))
    ax.set_ylim(-0.6, len(traces) - 0.3)
    ax.set_xlim(-0.02 * latest, 1.3 * latest)  # room for the names of the ends
    ax.set_xlabel("seconds since accepted (server) / since the request (client, above each strip)")
    ax.legend(legend.values(), legend.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def event_name(event: dict[str, Any]) -> str:
    """A trace event as the lessons write it: ``done(stop)``, ``first_token``."""
    return event["name"] + (f"({event['detail']})" if event["detail"] else "")


def _client_kinds(rec: Recording | None) -> dict[str, list[float]]:
    if rec is None:
        return {}
    zero = rec.arrivals[0].at if rec.arrivals and rec.arrivals[0].kind == "other" else 0.0
    return {kind: [x - zero for x in xs] for kind in _STRIP_CLIENT if (xs := rec.times(kind))}


def read_cuts(body: bytes, chunkings: dict[str, list[bytes]], *, title: str = ""):
    """Where each chunking cut the body (a line per cut, one row each) over
    where its events end (the shaded bands, one per event): the network
    cuts anywhere, and a reader must not care."""
    import matplotlib.pyplot as plt

    ends, start = [], 0
    while (i := body.find(b"\n\n", start)) != -1:
        ends.append(start := i + 2)
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.5 * len(chunkings)))
    for k, (lo, hi) in enumerate(itertools.pairwise([0, *ends])):
        ax.axvspan(lo, hi, color="tab:blue" if k % 2 else "tab:cyan", alpha=0.15, lw=0)
    for y, chunks in enumerate(reversed(chunkings.values())):
        cuts, at = [], 0
        for chunk in chunks[:-1]:
            cuts.append(at := at + len(chunk))
        inside = sum(cut not in ends for cut in cuts)
        ax.vlines(cuts, y - 0.3, y + 0.3, color="black", lw=0.6 if len(cuts) < 200 else 0.2)
        ax.annotate(
            f"{len(chunks)} read{'s' if len(chunks) > 1 else ''}, {inside} cut inside an event",
            (len(body), y),
            textcoords="offset points",
            xytext=(6, -3),
            fontsize="small",
        )
    ax.set_yticks(range(len(chunkings)), list(reversed(chunkings)))
    ax.set_xlim(0, len(body))
    ax.set_ylim(-0.6, len(chunkings) - 0.4)
    ax.set_xlabel(f"byte offset in the body ({len(body):,} bytes; shaded: one band per event)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def held_window(runs: dict[str, Any], *, title: str = ""):
    """Lesson 06: one line per ``refimpl.examples.h2_window.HeldRun`` in two
    panels, the held stream's tokens made (log scale: the runs differ a
    thousandfold) and the server's RSS growth, against the seconds since its
    response began; a dot where its sibling on the same connection ended."""
    import matplotlib.pyplot as plt

    fig, (made, rss) = plt.subplots(1, 2, figsize=(11, 3.4))
    for label, run in runs.items():
        times, tokens, kib = zip(*run.samples, strict=True)
        (line,) = made.plot(times, tokens, marker=".", label=f"{label}: {run.tokens:,} tokens")
        rss.plot(
            times,
            [k / 1024 for k in kib],
            marker=".",
            color=line.get_color(),
            label=f"{label}: +{run.growth_mib:,.0f} MiB",
        )
        if run.sibling_ended is not None:
            i = min(range(len(times)), key=lambda j: abs(times[j] - run.sibling_ended))
            made.scatter([times[i]], [tokens[i]], color=line.get_color(), s=60, zorder=3, edgecolor="black")
    made.set_yscale("log")
    made.set_ylabel("tokens the held stream's model made")
    rss.set_ylabel("server RSS growth, MiB")
    for ax in (made, rss):
        ax.set_xlabel("seconds since the held stream's response began")
        ax.legend(loc="center right", fontsize="small")
        ax.grid(alpha=0.3)
    made.set_title("the held stream (a dot: its sibling ended, whole)", fontsize="medium")
    rss.set_title("memory", fontsize="medium")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
