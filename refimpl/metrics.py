"""Prometheus metrics for the streaming server (``GET /metrics``).

Strategy
--------
Operators watch a streaming server through a handful of numbers: how many
generations are running right now (a *gauge*, which must fall back to zero
when clients leave — the simplest leak detector there is), how many tokens
went out, and how many streams ended early and why (*counters* labelled by
reason).  We use the official ``prometheus_client`` and give every app its
own ``CollectorRegistry``, so tests that start several servers in one process
never share or clash on counters.

Names (public, DESIGN §2): ``refimpl_active_generations``,
``refimpl_queued_generations``,
``refimpl_generations_total``, ``refimpl_tokens_total``,
``refimpl_cancellations_total{reason}``, ``refimpl_errors_total{reason}``,
``refimpl_heartbeats_total``; for resumable streams (lesson 11)
``refimpl_resumes_total{where}`` (``local``: the log was in this process;
``mirror``: it ran in another one, through Redis) and
``refimpl_resume_logs`` (replay logs this process keeps now).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


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

        self.resumes = Counter(
            "refimpl_resumes",
            "GET /v1/chat/completions/{id}/events answered with a stream, by where its log was.",
            ["where"],
            registry=r,
        )
        self.resume_logs = Gauge("refimpl_resume_logs", "Replay logs kept in this process.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
