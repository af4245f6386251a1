"""The figures of ``refimpl bench``: lesson 13's notebook and the bench's results folder.

Strategy
--------
A benchmark's numbers are distributions, and a table of percentiles hides
their shape, so these draw them whole, each from a real run's samples (STYLE,
"Figures"): :func:`distributions` (histograms with their p50 and p99),
:func:`bench_costs` (CPU and reads per token, side by side), and the plots
``refimpl bench`` writes to its results folder (``bench_report.py``):
:func:`latency_cdfs` (TTFT and ITL per server, tails and all) and
:func:`over_concurrency` (a figure's median against the number of streams).
matplotlib is imported inside each function: only the notebooks and the
bench's plots need it.
"""

from __future__ import annotations

from typing import Any


def distributions(
    panels: dict[str, dict[str, list[float]]], *, unit: str = "ms", scale: float = 1000, title: str = ""
):
    """One histogram panel per key, one outline per series in it (seconds,
    shown times ``scale`` in ``unit``), each series' p50 dashed and p99
    dotted in its colour.  The axis ends at the largest p99 and a half: a
    rare long gap would squash the rest, so what lies beyond is left out and
    counted in the legend instead.  Counts are on a log scale when a panel
    holds hundreds of samples, so that a tail of a few still shows."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        scaled = {label: np.asarray(values) * scale for label, values in series.items() if len(values)}
        right = max(1.5 * np.percentile(v, 99) for v in scaled.values()) or 1.0
        bins = np.linspace(0, right, 41)
        for label, values in scaled.items():
            p50, p99 = np.percentile(values, [50, 99])
            beyond = int((values > right).sum())
            more = f", {beyond} beyond" if beyond else ""
            _, _, (patch,) = ax.hist(
                values[values <= right],
                bins=bins,
                histtype="step",
                lw=1.5,
                label=f"{label}: p50 {_num(p50)}, p99 {_num(p99)} {unit}\n({len(values):,} samples{more})",
            )
            ax.axvline(p50, color=patch.get_edgecolor(), ls="--", lw=1)
            ax.axvline(p99, color=patch.get_edgecolor(), ls=":", lw=1)
        log = max(len(v) for v in scaled.values()) >= 200
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("count (log)" if log else "count")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(unit)
        ax.legend(loc="best", fontsize="x-small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def bench_costs(results: dict[str, dict[str, Any]], *, title: str = ""):
    """Grouped bars, one group per scenario and one bar per server
    (``refimpl.notebook.BenchRun``): the server's CPU per token, and the
    client's network reads per token (1: one write per event; far below 1:
    many events per write)."""
    import matplotlib.pyplot as plt

    servers = list(dict.fromkeys(s for runs in results.values() for s in runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    width = 0.8 / len(servers)
    for ax, (what, unit) in zip(
        axes,
        (("cpu_us_per_token", "server CPU per token (µs)"), ("reads_per_token", "client reads per token")),
        strict=True,
    ):
        for k, server in enumerate(servers):
            xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(results))]
            values = [getattr(runs[server], what) for runs in results.values()]
            bars = ax.bar(xs, values, width, label=server)
            ax.bar_label(bars, fmt="%.3g", fontsize="small")
        ax.set_xticks(range(len(results)), list(results), fontsize="small")
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def latency_cdfs(
    panels: dict[str, dict[str, list[float]]],
    *,
    marks: dict[str, float] | None = None,
    columns: int = 2,
    unit: str = "ms",
    scale: float = 1000,
    title: str = "",
):
    """One panel per key, one CDF per series in it (seconds, shown times
    ``scale`` in ``unit``): ``refimpl bench``'s TTFT and ITL per server.
    The y axis is a logit scale, on which p50 to p90 is as far as p90 to p99
    and p99 to p99.9: the tail, which a linear axis squeezes into its top
    line, gets as much room as the middle.  ``marks`` draws a dashed line in
    a panel at what the model alone would take (the configured ttft or itl).
    The x axis ends at the largest p99.9 and a fifth; the legend gives each
    series' max, so a long outlier is told, not drawn."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullLocator

    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        left, right = 0.0, 0.0
        for label, values in series.items():
            if not len(values):
                continue
            v = np.sort(np.asarray(values) * scale)
            n = len(v)
            # Every sample at (i + 1/2) / n (never 0 or 1, which logit cannot
            # place); past a few thousand, 2,000 quantiles spaced evenly on
            # the logit axis draw the same curve.
            p = (np.arange(n) + 0.5) / n
            if n > 4000:
                lo, hi = np.log(p[0] / (1 - p[0])), np.log(p[-1] / (1 - p[-1]))
                p = 1 / (1 + np.exp(-np.linspace(lo, hi, 2000)))
                v = np.quantile(v, p)
            p50, p99 = np.percentile(values, [50, 99]) * scale
            left, right = min(left, v[0]), max(right, 1.2 * float(np.percentile(values, 99.9)) * scale)
            ax.plot(
                v, p, lw=1.5, label=f"{label}: p50 {_num(p50)}, p99 {_num(p99)}, max {_num(v[-1])} {unit}"
            )
        if marks and name in marks:
            ax.axvline(marks[name] * scale, color="grey", ls="--", lw=1, label="the model alone")
        ax.set_yscale("logit")
        ax.yaxis.set_minor_locator(NullLocator())
        lo, hi = ax.get_ylim()
        ticks = [q for q in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999) if lo <= q <= hi]
        ax.set_yticks(ticks, [f"p{100 * q:g}" for q in ticks])
        ax.set_ylim(lo, hi)
        ax.set_xlim(left, right or 1.0)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(unit)
        ax.set_ylabel("percentile (this many at most x)")
        ax.legend(loc="lower right", fontsize="x-small")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def over_concurrency(
    panels: dict[str, dict[str, dict[int, float]]],
    *,
    ideal: dict[str, dict[int, float]] | None = None,
    columns: int = 2,
    title: str = "",
):
    """One panel per figure, one line per server: its value at each number
    of concurrent streams (``refimpl bench --streams 200 1000 2000``'s
    medians).  ``ideal`` adds a dashed line to a panel: what a server that
    added nothing would reach (tokens/s: streams / itl)."""
    import matplotlib.pyplot as plt

    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        xs = sorted({x for points in series.values() for x in points})
        for label, points in series.items():
            mine = [x for x in xs if points.get(x) is not None]
            ax.plot(mine, [points[x] for x in mine], marker="o", label=label)
        if ideal and name in ideal:
            ax.plot(xs, [ideal[name][x] for x in xs], color="grey", ls="--", lw=1, label="ideal")
        ax.set_xticks(xs)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("concurrent streams")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
