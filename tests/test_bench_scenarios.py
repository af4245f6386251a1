"""``refimpl bench paced`` and ``burst``: a CI-sized smoke run of each, on real servers.

Each scenario runs once for the whole module, as a user runs it but small
(a handful of streams of 20 tokens, a model that waits 5 ms and then 1 ms
between tokens), against real server subprocesses and real load-generator
processes: ``paced`` against every server the bench knows, ``burst`` at two
concurrencies (so that the plot over concurrency is drawn) with the streams
split over two load processes, and refimpl both as one process and as
``refimpl serve --workers 2``.  What is checked must hold on any machine:
every figure for every server, exact token counts, no errors, the plots
as valid PNGs, the 2-worker server measured as its three processes.  No
assertion is about how long anything took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from refimpl import bench
from refimpl.bench_report import RATIOS, ROWS
from refimpl.benchload import SERVERS

TOKENS = 20
SMALL = ("--tokens", str(TOKENS), "--ttft-ms", "5", "--itl-ms", "1")


def run_bench(out: Path, *argv: str) -> tuple[int, str, dict[str, Any]]:
    """``refimpl bench ARGV --out OUT`` in this process: exit code, stdout, results.json."""
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv, "--out", str(out)])
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = trio.run(bench.run, args)
    return code, stdout.getvalue(), json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def paced(tmp_path_factory):
    out = tmp_path_factory.mktemp("paced")
    return out, *run_bench(out, "paced", "--streams", "4", *SMALL, "--servers", *SERVERS)


@pytest.fixture(scope="module")
def burst(tmp_path_factory):
    out = tmp_path_factory.mktemp("burst")
    return out, *run_bench(
        out, "burst", "--streams", "3", "6", *SMALL, "--load-procs", "2", "--workers", "1", "2"
    )


@pytest.fixture(params=["paced", "burst"])
def scenario(request):
    return request.getfixturevalue(request.param)


def test_it_ran_without_an_error(scenario):
    _, code, _, result = scenario
    assert code == 0, [r["error_messages"] for r in result["runs"]]


def test_every_run_has_every_figure_and_exact_token_counts(scenario):
    _, _, _, result = scenario
    config = result["config"]
    assert len(result["runs"]) == len(config["streams"]) * len(config["variants"])
    for run in result["runs"]:
        assert run["tokens"] == run["streams"] * TOKENS, run
        assert run["errors"] == run["setup_failures"] == 0 and run["error_messages"] == []
        for _, key, _, _ in ROWS:
            assert isinstance(run[key], int | float), (run["server"], key, run[key])
        # Every stream opened a connection of its own, and the kernel was read.
        assert run["connect_ms_p50"] is not None and run["listen_overflows"] >= 0
        assert 0 < run["rss_before_kib"] <= run["rss_peak_kib"]
        procs = run["load_procs"]
        assert len(procs) == config["load_procs"] and sum(p["streams"] for p in procs) == run["streams"]
        assert all(p["cpu_s"] > 0 and p["cpu_share"] > 0 and p["lag_ms_p99"] is not None for p in procs)
        assert run["client_cpu_share_max"] == max(p["cpu_share"] for p in procs)


def test_the_summary_has_every_server_at_every_concurrency_with_its_ratios(scenario):
    _, _, stdout, result = scenario
    config = result["config"]
    assert list(result["summary"]) == [str(n) for n in config["streams"]]
    for servers in result["summary"].values():
        assert list(servers) == list(config["variants"])
        base = servers["sse-starlette"]
        for figures in servers.values():
            assert all(figures[key] is not None for _, key, _, _ in ROWS)
            assert set(figures["ratio"]) == set(RATIOS)
            # These two are above zero in any run, so their ratios always exist.
            for key in ("cpu_us_per_token", "tokens_per_s"):
                assert figures["ratio"][key] == round(figures[key] / base[key], 3)
    # The table: a column per server, a row per figure, once per concurrency.
    for label, _, _, _ in ROWS:
        assert stdout.count(f"\n{label} ") == len(config["streams"]), label
    assert all(server in stdout for server in config["variants"])


def test_the_plots_are_png_files(scenario):
    out, _, stdout, result = scenario
    expected = ["latency.png"] + (["concurrency.png"] if len(result["config"]["streams"]) > 1 else [])
    assert result["plots"] == expected
    for name in expected:
        assert f"plot: {out / name}" in stdout
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 100
            png.verify()  # the whole file, chunk by chunk


def test_paced_measured_every_server_and_burst_split_its_load(paced, burst):
    assert paced[3]["config"]["servers"] == list(SERVERS)
    assert burst[3]["config"]["load_procs"] == 2 and burst[3]["config"]["streams"] == [3, 6]
    assert list(burst[3]["config"]["variants"]) == ["refimpl", "refimpl×2", "sse-starlette"]


def test_two_workers_are_measured_as_the_parent_and_both_workers(burst):
    """``--workers 1 2``: refimpl×2's CPU and RSS are sums over three
    processes (the pids recorded), refimpl's over one; under the table, the
    scaling line from one worker to two, and the note on the peers."""
    _, _, stdout, result = burst
    runs = {(r["server"], r["streams"]): r for r in result["runs"]}
    for streams in (3, 6):
        one, two = runs["refimpl", streams], runs["refimpl×2", streams]
        assert (one["workers"], len(one["server_pids"])) == (1, 1)
        parent, *workers = two["server_pids"]
        assert two["workers"] == 2 and len(set(workers)) == 2 and parent not in workers
        assert two["server_cpu_s"] > 0
        # Three interpreters hold more than one does: the sum covers all of them.
        assert two["rss_before_kib"] > 1.5 * one["rss_before_kib"]
    for servers in result["summary"].values():
        scaling = servers["refimpl×2"]["scaling"]
        assert (scaling["over"], scaling["workers"]) == ("refimpl", [1, 2])
        one, two = servers["refimpl"], servers["refimpl×2"]
        assert scaling["ratio"]["tokens_per_s"] == round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        assert "scaling" not in one and "scaling" not in servers["sse-starlette"]
    assert stdout.count("\nscaling 1→2 workers (refimpl×2 / refimpl): tokens/s ×") == 2
    assert "The peers run as one process each" in stdout
