"""What ``refimpl bench`` reports: the figures, their medians and ratios, the table, the folder.

Strategy
--------
``bench_scenarios.py`` measures; this module turns what it measured into
what a reader looks at, in one place so that the table, the JSON and the
plots cannot disagree.  One *run* is one server under one load; its
figures come from the client's samples and the server's ``/proc`` readings
(:func:`figures`, each explained in lesson 13, "What the bench reports").
Latencies are reported as what the server *added*: the TTFT a client saw
minus the ``ttft_ms`` the model was told to take, the ITL minus ``itl_ms``,
so that a perfect server scores 0 whatever the scenario.  With ``--repeat
R`` each figure is the median of R runs, and the issue's goals are ratios
to the sse-starlette peer taken within one invocation (a shared machine
drifts between invocations, lesson 13, "Results"): CPU per token, the TTFT
and ITL tails, delivered tokens/s and memory per stream.  With ``--workers
1 2``, a line under the table gives refimpl×2 over refimpl, the same
figures (:data:`SCALING`), and how busy the cores were, server and load
generator: on a small machine they share the same cores, and a scaling
figure means little when they were all busy.

The folder (``bench-results/<scenario>-<timestamp>/``, or ``--out``) holds
``results.json`` (the settings, the machine, every run, the medians and
ratios, and the command that repeats it) and the PNG plots, drawn with the
notebooks' helpers in ``figures.py`` on matplotlib's Agg backend (no
display needed): ``latency.png``, the CDFs of TTFT and ITL per server, and
with more than one ``--streams``, ``concurrency.png``, the medians over
concurrency (:func:`latency_figure`, :func:`concurrency_figure`, which
notebook 13 shows inline).  Without matplotlib there are no plots, and the
bench says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .benchload import Load, Plan


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


#: What the numbers depend on: the servers' stacks and the client's.
DISTRIBUTIONS = (
    "trio",
    "hypercorn",
    "quart",
    "quart-trio",
    "uvicorn",
    "fastapi",
    "sse-starlette",
    "starlette",
    "httpx",
    "h11",
)


def environment() -> dict[str, Any]:
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


# -- one run's figures ----------------------------------------------------------------
def figures(load: Load, plan: Plan, server: dict[str, Any], clients: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures: ``load`` is what the clients saw, ``plan`` what was
    asked, ``server`` the kernel's readings (cpu_s, rss_before_kib,
    rss_peak_kib, listen_overflows), ``clients`` each load process's CPU and
    loop lag (``bench_client``)."""
    wall = load.ended - load.started
    cpu = server["cpu_s"]
    ttft_added = [t - plan.ttft_ms / 1000 for t in load.ttft]
    itl_added = [t - plan.itl_ms / 1000 for t in load.itl]
    out = {"tokens": load.tokens, "wall_s": round(wall, 4), "tokens_per_s": round(load.tokens / wall, 1)}
    out |= {
        "server_cpu_s": round(cpu, 6),
        "cpu_us_per_token": round(cpu / load.tokens * 1e6, 3) if load.tokens else None,
        "server_cpu_share": round(cpu / wall, 4),
    }
    for name, samples in (
        ("ttft_ms", load.ttft),
        ("ttft_added_ms", ttft_added),
        ("ttft_from_connect_ms", load.ttft_from_connect),
        ("connect_ms", load.connect),
        ("itl_ms", load.itl),
        ("itl_added_ms", itl_added),
    ):
        out |= {f"{name}_p{q}": ms(percentile(samples, q)) for q in (50, 99)}
    out["e2e_ms_p50"] = ms(percentile(load.e2e, 50))
    before, peak = server["rss_before_kib"], server["rss_peak_kib"]
    out |= {
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_kib_per_stream": (peak - before) / plan.streams,
    }
    out |= {
        "errors": len(load.errors),
        "setup_failures": load.setup_failures,
        "listen_overflows": server["listen_overflows"],
        "client_reads": load.reads,
        "client_cpu_share_max": max(c["cpu_share"] for c in clients),
        "client_cpu_share_total": round(sum(c["cpu_share"] for c in clients), 4),
        "client_lag_ms_p99": max(
            (c["lag_ms_p99"] for c in clients if c["lag_ms_p99"] is not None), default=None
        ),
        "load_procs": clients,
        "error_messages": load.errors[:20],
    }
    return out


# -- medians, ratios, the table ---------------------------------------------------------
#: (label, key, how to show it, ratio to the baseline?): the table's rows, in order.
ROWS = (
    ("tokens received", "tokens", "int", False),
    ("server CPU µs/token", "cpu_us_per_token", "num", True),
    ("server CPU, share of a core", "server_cpu_share", "pct", False),
    ("TTFT added p50, ms", "ttft_added_ms_p50", "num", False),
    ("TTFT added p99, ms", "ttft_added_ms_p99", "num", True),
    ("ITL added p50, ms", "itl_added_ms_p50", "num", False),
    ("ITL added p99, ms", "itl_added_ms_p99", "num", True),
    ("TTFT from connect p99, ms", "ttft_from_connect_ms_p99", "num", False),
    ("TCP connect p99, ms", "connect_ms_p99", "num", False),
    ("tokens/s delivered", "tokens_per_s", "int", True),
    ("RSS per stream, KiB", "rss_kib_per_stream", "num", True),
    ("errors", "errors", "int", False),
    ("set-up failures", "setup_failures", "int", False),
    ("listen queue overflows", "listen_overflows", "int", False),
    ("client reads", "client_reads", "int", False),
    ("client CPU, max share", "client_cpu_share_max", "pct", False),
    ("client CPU, all processes", "client_cpu_share_total", "pct", False),
    ("client loop lag p99, ms", "client_lag_ms_p99", "num", False),
)
RATIOS = tuple(key for _, key, _, ratio in ROWS if ratio)
#: (label, key): the figures of the scaling line, refimpl with N workers over refimpl.
SCALING = (
    ("tokens/s", "tokens_per_s"),
    ("TTFT added p99", "ttft_added_ms_p99"),
    ("ITL added p99", "itl_added_ms_p99"),
    ("CPU µs/token", "cpu_us_per_token"),
)


def ratios(mine: dict[str, Any], base: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float | None]:
    """``mine[key] / base[key]`` for each key; None where either is missing
    or the base is not above zero."""
    return {
        key: round(mine[key] / base[key], 3) if mine[key] is not None and (base.get(key) or 0) > 0 else None
        for key in keys
    }


def summarize(
    runs: list[dict[str, Any]], baseline: str, variants: dict[str, tuple[str, int]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """streams -> server -> the median of every figure over its runs, and its
    ratios to ``baseline`` where the issue asks for one.  ``variants``
    (label -> (server, workers), ``Settings.variants``): a server measured
    with more workers than its fewest also gets ``scaling``, its
    :data:`SCALING` figures over that one's."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        summary.setdefault(str(run["streams"]), {}).setdefault(run["server"], {"runs": 0})["runs"] += 1
    for streams, servers in summary.items():
        for server, out in servers.items():
            mine = [r for r in runs if str(r["streams"]) == streams and r["server"] == server]
            for _, key, _, _ in ROWS:
                values = [r[key] for r in mine if r[key] is not None]
                out[key] = statistics.median(values) if values else None
        base = servers.get(baseline, {})
        for out in servers.values():
            out["ratio"] = ratios(out, base, RATIOS)
        for label, (server, workers) in (variants or {}).items():
            fewest = min((v for v in variants if variants[v][0] == server), key=lambda v: variants[v][1])
            if fewest != label and {label, fewest} <= servers.keys():
                servers[label]["scaling"] = {
                    "over": fewest,
                    "workers": [variants[fewest][1], workers],
                    "ratio": ratios(servers[label], servers[fewest], tuple(key for _, key in SCALING)),
                }
    return summary


def cell(value: float | None, how: str, ratio: float | None = None) -> str:
    if value is None:
        text = "-"
    elif how == "pct":
        text = f"{value:.0%}"
    elif how == "int" or abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    return text + (f" ({ratio:.2f}×)" if ratio is not None else "")


def table(servers: dict[str, dict[str, Any]], baseline: str) -> str:
    """One column per server; a ratio beside each figure the issue compares to ``baseline``."""
    rows = [
        (
            label,
            [cell(s[key], how, None if k == baseline else s["ratio"].get(key)) for k, s in servers.items()],
        )
        for label, key, how, _ in ROWS
    ]
    width = max(16, *(len(c) + 2 for _, cells in rows for c in cells))
    lines = [f"{'':30}" + "".join(f"{k:>{width}}" for k in servers)]
    lines += [f"{label:30}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in rows]
    lines += [scaling_line(name, s) for name, s in servers.items() if "scaling" in s]
    return "\n".join(lines)


def scaling_line(name: str, s: dict[str, Any]) -> str:
    """``scaling 1→2 workers (refimpl×2 / refimpl): tokens/s ×1.02, ...``, and
    the cores the server and the load generator kept busy meanwhile."""
    scaling = s["scaling"]
    few, many = scaling["workers"]
    each = ", ".join(
        f"{what} ×{r:.2f}" if (r := scaling["ratio"][key]) is not None else f"{what} -"
        for what, key in SCALING
    )
    busy = [s["server_cpu_share"], s["client_cpu_share_total"]]
    cores = "" if None in busy else f"; {name} busy: server {busy[0]:.2f} + load {busy[1]:.2f} cores"
    return f"scaling {few}→{many} workers ({name} / {scaling['over']}): {each}{cores} of {os.cpu_count()}"


# -- the folder ---------------------------------------------------------------------------
def write_results(folder: Path, result: dict[str, Any]) -> Path:
    path = folder / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_plots(
    folder: Path, samples: dict[tuple[str, int], list[Load]], result: dict[str, Any]
) -> list[str]:
    """The PNGs (see the header); returns their file names, none without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")  # files only: no display, in a terminal, a test or CI
    import matplotlib.pyplot as plt

    figs = {"latency.png": latency_figure(samples, result)}
    if len(result["config"]["streams"]) > 1:
        figs["concurrency.png"] = concurrency_figure(result)
    for name, fig in figs.items():
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
    return list(figs)


# The two figures are drawn on the current matplotlib backend: Agg in
# write_plots, inline in a notebook (refimpl.notebook.bench_scenario).
def _title(cfg: dict[str, Any]) -> str:
    return f"refimpl bench {cfg['scenario']}: {cfg['tokens']} tokens, ttft {cfg['ttft_ms']:g} ms, itl {cfg['itl_ms']:g} ms"


def latency_figure(samples: dict[tuple[str, int], list[Load]], result: dict[str, Any]):
    """``latency.png``: the CDFs of TTFT and ITL, a panel each per
    ``--streams``, a line per server, every run's samples pooled."""
    from .bench_figures import latency_cdfs

    cfg = result["config"]
    servers = list(cfg["variants"])  # the columns: refimpl once per --workers, the peers
    panels: dict[str, dict[str, list[float]]] = {}
    marks: dict[str, float] = {}
    for streams in cfg["streams"]:
        for what, attr, model_ms in (("TTFT", "ttft", cfg["ttft_ms"]), ("ITL", "itl", cfg["itl_ms"])):
            name = f"{what}, {streams} streams"
            panels[name] = {
                s: [x for load in samples[s, streams] for x in getattr(load, attr)] for s in servers
            }
            marks[name] = model_ms / 1000
    return latency_cdfs(panels, marks=marks, title=f"{_title(cfg)} (from the request sent)")


def concurrency_figure(result: dict[str, Any]):
    """``concurrency.png``: four of the medians against ``--streams``, a line per server."""
    from .bench_figures import over_concurrency

    cfg, summary = result["config"], result["summary"]
    servers = list(cfg["variants"])
    over = {
        label: {s: {int(n): summary[n][s][key] for n in summary} for s in servers}
        for label, key in (
            ("tokens/s delivered", "tokens_per_s"),
            ("RSS per stream, KiB", "rss_kib_per_stream"),
            ("server CPU µs/token", "cpu_us_per_token"),
            ("ITL added p99, ms", "itl_added_ms_p99"),
        )
    }
    ideal = (
        {"tokens/s delivered": {n: n / (cfg["itl_ms"] / 1000) for n in cfg["streams"]}}
        if cfg["itl_ms"]
        else None
    )
    return over_concurrency(over, ideal=ideal, title=f"{_title(cfg)}, medians over concurrency")
