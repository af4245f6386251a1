"""Scrape ``/metrics`` while a load runs, and turn the scrapes into time series.

Strategy
--------
Prometheus scrapes a server every few seconds and a dashboard turns the
counters into rates and the histograms into quantiles (``rate``,
``histogram_quantile``).  A notebook has no Prometheus, so this does the
same in a few lines: scrape every ``every_ms`` while the load runs, parse
each scrape with ``prometheus_client.parser`` (the exposition format, read by
its own library), and compute over a sliding window of ``window_s``
seconds what the example dashboard (``grafana-dashboard.json``) draws:
tokens/s and bytes/s (counter deltas over time), the gauges as they are, and
TTFT and ITL quantiles from the histogram buckets, interpolated inside a
bucket as ``histogram_quantile`` does — so a p99 is only as fine as the
buckets around it (``metrics.py`` says why they are where they are).

In a notebook (lesson 14), with the server running and ``%autoawait trio``::

    from refimpl.examples.scrape_metrics import scrape_during
    series = await scrape_during(url, my_load, every_ms=100)
    plt.plot(series.t, series.tokens_per_s)

From a shell, against a running ``refimpl serve``::

    python -m refimpl.examples.scrape_metrics http://127.0.0.1:8000 --every-ms 500 --seconds 30
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

TTFT = "refimpl_time_to_first_token_seconds"
ITL = "refimpl_inter_token_latency_seconds"


@dataclass(frozen=True)
class Scrape:
    at: float  # trio.current_time() when it was taken
    values: dict[str, float]  # unlabelled samples and sums over labels: name -> value
    buckets: dict[str, dict[float, float]]  # histogram -> {le: cumulative count}, all protocols


def parse(text: str, at: float, protocol: str | None = None) -> Scrape:
    """One scrape.  Labelled samples are summed over their labels (only
    ``protocol``'s, if given), so ``refimpl_sent_bytes_total`` is all bytes."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if protocol is not None and s.labels.get("protocol", protocol) != protocol:
                continue
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                per_le = buckets.setdefault(s.name.removesuffix("_bucket"), {})
                per_le[le] = per_le.get(le, 0.0) + s.value
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    return Scrape(at, values, buckets)


# region: quantile
def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative bucket counts: find the
    bucket the q-th observation falls in and interpolate linearly inside it.
    None when there are no observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # past the last finite bucket: its bound is all we know
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


# endregion: quantile


@dataclass
class Series:
    """Time series, one point per scrape (the first scrape is t = 0)."""

    t: list[float] = field(default_factory=list)
    active: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)
    paused: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)  # cumulative
    tokens_per_s: list[float] = field(default_factory=list)
    bytes_per_s: list[float] = field(default_factory=list)
    ttft_p50: list[float | None] = field(default_factory=list)
    ttft_p99: list[float | None] = field(default_factory=list)
    itl_p50: list[float | None] = field(default_factory=list)
    itl_p99: list[float | None] = field(default_factory=list)


def series(scrapes: list[Scrape], window_s: float = 1.0) -> Series:
    """Rates and quantiles over the last ``window_s`` seconds at each scrape
    (the first point has no window yet: rate 0, quantiles over everything)."""
    out = Series()
    for i, now in enumerate(scrapes):
        then = next(s for s in scrapes[: i + 1] if s.at >= now.at - window_s)
        then = scrapes[i - 1] if then is now and i > 0 else then
        span = now.at - then.at
        v, w = now.values, then.values
        out.t.append(now.at - scrapes[0].at)
        out.active.append(v.get("refimpl_active_generations", 0.0))
        out.queued.append(v.get("refimpl_queued_generations", 0.0))
        out.paused.append(v.get("refimpl_paused_streams", 0.0))
        out.tokens.append(v.get("refimpl_tokens_total", 0.0))

        def rate(name: str, v=v, w=w, span=span) -> float:
            return (v.get(name, 0.0) - w.get(name, 0.0)) / span if span > 0 else 0.0

        out.tokens_per_s.append(rate("refimpl_tokens_total"))
        out.bytes_per_s.append(rate("refimpl_sent_bytes_total"))
        for name, p50, p99 in ((TTFT, out.ttft_p50, out.ttft_p99), (ITL, out.itl_p50, out.itl_p99)):
            new, old = now.buckets.get(name, {}), then.buckets.get(name, {}) if span > 0 else {}
            delta = {le: count - old.get(le, 0.0) for le, count in new.items()}
            p50.append(quantile(0.5, delta))
            p99.append(quantile(0.99, delta))
    return out


# region: scrape-during
async def scrape_during(
    url: str,
    load: Callable[[], Awaitable[object]],
    every_ms: float = 250,
    window_s: float = 1.0,
    protocol: str | None = None,
) -> Series:
    """Run ``await load()`` and scrape ``url/metrics`` every ``every_ms``
    meanwhile (once before and once after too); the time series of it."""
    scrapes: list[Scrape] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def take() -> None:
            text = (await client.get("/metrics")).raise_for_status().text
            scrapes.append(parse(text, trio.current_time(), protocol))

        async def keep_scraping() -> None:
            while True:
                await trio.sleep(every_ms / 1000)  # the scrape interval, not a synchronisation
                await take()

        await take()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_scraping)
            await load()
            nursery.cancel_scope.cancel()
        await take()
    return series(scrapes, window_s)


# endregion: scrape-during


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Scrape a refimpl server's /metrics; print one CSV row per scrape."
    )
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--every-ms", type=float, default=500, help="scrape interval (default 500)")
    p.add_argument("--seconds", type=float, default=10, help="how long to scrape (default 10)")
    p.add_argument("--window-s", type=float, default=2.0, help="rate/quantile window (default 2)")
    p.add_argument(
        "--protocol", help="only this protocol's histograms and bytes (sse, http, websocket, grpc)"
    )
    args = p.parse_args(argv)

    async def wait() -> None:  # the load is someone else's: scrape for --seconds
        await trio.sleep(args.seconds)

    s = trio.run(scrape_during, args.url, wait, args.every_ms, args.window_s, args.protocol)

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    columns = ["t", "active", "queued", "paused", "tokens_per_s", "bytes_per_s"]
    columns += ["ttft_p50", "ttft_p99", "itl_p50", "itl_p99"]
    print(",".join(columns))
    for row in zip(*(getattr(s, c) for c in columns), strict=True):
        print(",".join(fmt(x) for x in row))


if __name__ == "__main__":
    main()
