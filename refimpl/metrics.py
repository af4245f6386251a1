"""Prometheus metrics for the streaming server (``GET /metrics``).

Strategy
--------
Operators watch a streaming server through a handful of numbers: how many
generations are running right now (a *gauge*, which must fall back to zero
when clients leave — the simplest leak detector there is), how many tokens
went out, how long people wait for the first one and between the others
(*histograms*, so that a dashboard can draw p50 and p99 with PromQL's
``histogram_quantile``), and how many streams ended early and why
(*counters* labelled by reason).  We use the official ``prometheus_client``
and give every app its own ``CollectorRegistry``, so tests that start
several servers in one process never share or clash on counters.  Names
follow Prometheus' conventions: the unit in the name (``_seconds``,
``_bytes``), ``_total`` on counters (the client adds it).

Names (public: DESIGN §2, the example dashboard, lesson 14's notebook):

``refimpl_active_generations``, ``refimpl_queued_generations``  gauges: running now, waiting
    for a slot (``--max-queue``, lesson 09)
``refimpl_generations_total``, ``refimpl_tokens_total``  started; completion tokens made
``refimpl_cancellations_total{reason}``, ``refimpl_errors_total{reason}``  the trace's
    ``cancelled``/``error`` details (``trace.py``)
``refimpl_heartbeats_total``  SSE ``: ping`` comments and WebSocket pings (lesson 08)
``refimpl_time_to_first_token_seconds{protocol}``  histogram: from ``accepted`` to
    ``first_token`` in the trace, queueing included: what the user waits
``refimpl_inter_token_latency_seconds{protocol}``  histogram: the gap before each token
    after the first, as the engine hands tokens to the writer.  Tokens handed over
    in one pull (the model was ahead of the socket) leave in one write, so all but
    the first of them count as 0 s: that is what the client sees.  Its
    ``_count`` is ``tokens - 1`` per generation.  Under ``coalesce`` it is the
    model's pace (its producer pulls), not the socket's.
``refimpl_generation_duration_seconds{protocol,outcome}``  histogram: ``accepted`` to
    the terminal event; outcome ``done``, ``error`` or ``cancelled``
``refimpl_paused_streams``  gauge: streams the client holds back right now —
    a write blocked at least ``PAUSE_AFTER`` (``patterns/backpressure.py``), or
    ``coalesce``'s buffer full.  The trace's ``paused`` is stamped after the
    fact; this is read at scrape time, so a reader that stalls shows at once.
``refimpl_sent_bytes_total{protocol}``  response body bytes and WebSocket
    message payloads sent (headers and framing not counted): see :func:`count_sent`
``refimpl_resumes_total{where}``, ``refimpl_resume_logs``  resumable streams
    (lesson 11): ``local`` when the log was in this process, ``mirror`` through Redis
``refimpl_request_timeouts_total{part}``, ``refimpl_refused_connections_total``
    slow and half-sent requests (lesson 14): the 408s, ``headers`` or ``body``,
    and the connections over ``--max-connections-per-client``, closed unread

``protocol`` is ``Generation.protocol``: ``sse``, ``http`` (not streamed),
``websocket``, ``grpc`` (gRPC, gRPC-Web and Connect alike).

Cost.  TTFT and duration are observed once per generation with the stock
``Histogram``.  The inter-token histogram and the byte counter are touched on
every pull and every write, the hot path (lesson 13), so they are plain
Python numbers exported through the library's custom-collector interface at
scrape time: ``Histogram.observe`` takes two locks per call (~1.1 µs here)
for threads this server does not have, and has no way to count a batch of
tokens at once.  Measured (2 CPUs, timeit, process time): the metrics add
~1.0-1.5 µs per pull to ``Generation._produced`` (a clock read, a bisect, a
TTFT/ITL/tokens update) and ~0.1-0.3 µs per write to ``count_sent``; the
stock ``Histogram`` would have cost ~1.1 µs per *token*.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

# region: buckets
#: TTFT: a warm small model answers in tens of ms, a long prompt or a queue
#: takes seconds; past 10 s people have left.  Dense where SLOs are set
#: (0.1-2 s), since histogram_quantile interpolates inside a bucket.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
#: ITL: decoding runs at 10-100 tokens/s, so 10-100 ms is where most gaps
#: fall and where the buckets are dense; 1 ms holds the tokens that left in
#: the same write (0 s); 0.25 s and up are stalls (a paused client, a GC).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
#: Whole generations: seconds to minutes (2,000 tokens at 30 tokens/s is 67 s).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# endregion: buckets


class Held(Protocol):
    """A backpressure flow, as the paused gauge sees it."""

    def held_back(self) -> bool: ...


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge("refimpl_active_generations", "Generations running now.", registry=r)
        self.queued = Gauge(
            "refimpl_queued_generations", "Generations waiting for a slot (--max-queue).", registry=r
        )
        self.generations = Counter("refimpl_generations", "Generations started.", registry=r)
        self.tokens = Counter("refimpl_tokens", "Completion tokens produced.", registry=r)
        self.cancellations = Counter(
            "refimpl_cancellations",
            "Generations stopped early, by reason.",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("refimpl_errors", "Generations that failed, by reason.", ["reason"], registry=r)
        self.heartbeats = Counter(
            "refimpl_heartbeats",
            "Heartbeats sent while a generation ran: SSE comments, WebSocket pings.",
            registry=r,
        )
        self.ttft = Histogram(
            "refimpl_time_to_first_token_seconds",
            "From accepted to the first token, queueing included, by protocol.",
            ["protocol"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "refimpl_generation_duration_seconds",
            "From accepted to done, error or cancelled, by protocol and outcome.",
            ["protocol", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.itl = BulkHistogram(
            "refimpl_inter_token_latency_seconds",
            "Gap before each token after the first, as handed to the writer (0 s for tokens"
            " sent in the same write), by protocol.",
            ITL_BUCKETS,
        )
        self.sent = Tally(
            "refimpl_sent_bytes", "Response body and WebSocket message bytes sent, by protocol."
        )
        r.register(self.itl)
        r.register(self.sent)
        #: The backpressure flows of the streams running now (patterns/backpressure.py).
        self.flows: set[Held] = set()
        self.paused = Gauge(
            "refimpl_paused_streams",
            "Streams held back by their client right now (a write blocked, or coalesce's buffer full).",
            registry=r,
        )
        self.paused.set_function(lambda: sum(1 for flow in self.flows if flow.held_back()))

        # Slow and half-sent requests, connections per address (hypercorn_limits.py, lesson 14).
        self.request_timeouts = Counter(
            "refimpl_request_timeouts",
            "Requests answered 408: their headers or body did not arrive in time, by part.",
            ["part"],
            registry=r,
        )
        self.refused_connections = Counter(
            "refimpl_refused_connections",
            "Connections closed at once, unread: over --max-connections-per-client.",
            registry=r,
        )

        self.resumes = Counter(
            "refimpl_resumes",
            "GET /v1/chat/completions/{id}/events answered with a stream, by where its log was.",
            ["where"],
            registry=r,
        )
        self.resume_logs = Gauge("refimpl_resume_logs", "Replay logs kept in this process.", registry=r)

    # region: token-metrics
    def first_tokens(self, protocol: str, ttft: float, n: int) -> None:
        """The first ``n`` tokens of a generation, ``ttft`` seconds after it
        was accepted; those after the first left in the same write (0 s)."""
        self.tokens.inc(n)
        self.ttft.labels(protocol).observe(ttft)
        if n > 1:
            self.itl.observe(protocol, 0.0, n - 1)

    def more_tokens(self, protocol: str, gap: float, n: int) -> None:
        """``n`` more tokens, the first ``gap`` seconds after the previous one."""
        self.tokens.inc(n)
        self.itl.observe(protocol, gap, 1, zeros=n - 1)

    # endregion: token-metrics

    def ended(self, protocol: str, outcome: str, seconds: float) -> None:
        self.duration.labels(protocol, outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# region: bulk-histogram
class BulkHistogram:
    """A labelled histogram kept in plain numbers, for the hot path.

    ``observe(label, value, count)`` adds ``count`` observations of
    ``value`` in one step.  The registry calls :meth:`collect` at scrape time
    and gets the usual ``_bucket``/``_sum``/``_count`` samples.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = (*buckets, float("inf"))
        self.children: dict[str, list[float]] = {}  # label -> per-bucket counts, then the sum

    def observe(self, label: str, value: float, count: int = 1, zeros: int = 0) -> None:
        """``count`` observations of ``value``, and ``zeros`` of 0 (one call
        for a pull's tokens: the gap before the first, then 0 s each)."""
        child = self.children.get(label)
        if child is None:
            child = self.children[label] = [0] * len(self.bounds) + [0.0]
        child[bisect_left(self.bounds, value)] += count  # first bucket with le >= value
        child[0] += zeros
        child[-1] += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["protocol"])
        for label, child in self.children.items():
            running, buckets = 0, []
            for bound, n in zip(self.bounds, child, strict=False):
                running += n
                buckets.append((floatToGoString(bound), running))
            family.add_metric([label], buckets, child[-1])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=["protocol"])


# endregion: bulk-histogram


class Tally:
    """A labelled counter kept in plain numbers (see :class:`BulkHistogram`)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.counts: dict[str, list[int]] = {}  # label -> [count], a cell a writer keeps

    def cell(self, label: str) -> list[int]:
        return self.counts.setdefault(label, [0])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["protocol"])
        for label, (count,) in self.counts.items():
            family.add_metric([label], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=["protocol"])


# region: count-sent
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def count_sent(app: ASGIApp, metrics: Metrics) -> ASGIApp:
    """``app`` with every response body byte and WebSocket message counted.

    The one place every protocol's bytes pass: the ASGI ``send`` of the one
    app hypercorn serves (``app.serve``).  hypercorn's own write path sees
    connections, not requests (an HTTP/2 connection carries gRPC and SSE at
    once), and the writers are one per protocol and dialect.  The protocol
    label comes from the response: a WebSocket, ``text/event-stream``
    (``sse``), ``application/grpc*`` or ``application/connect*`` (``grpc``),
    anything else ``http`` -- which includes ``/metrics``, the demo page and
    every error answered before a stream started.
    """
    sent = metrics.sent

    async def counted(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":
            cell = sent.cell("websocket")

            async def send_ws(message: dict[str, Any]) -> None:
                if message["type"] == "websocket.send":
                    text = message.get("text")
                    cell[0] += len(text.encode()) if text is not None else len(message.get("bytes") or b"")
                await send(message)

            return await app(scope, receive, send_ws)
        if scope["type"] != "http":
            return await app(scope, receive, send)
        cell = [0]  # until the response starts

        # Counted as they are handed over, before the write: a client can
        # never have read bytes the counter does not have yet.
        async def send_http(message: dict[str, Any]) -> None:
            nonlocal cell
            if message["type"] == "http.response.body":
                cell[0] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                cell = sent.cell(_protocol_of(message.get("headers", ())))
            await send(message)

        await app(scope, receive, send_http)

    return counted


def _protocol_of(headers: Any) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            value = value.lower()
            if value.startswith(b"text/event-stream"):
                return "sse"
            if value.startswith((b"application/grpc", b"application/connect")):
                return "grpc"
            break
    return "http"


# endregion: count-sent
