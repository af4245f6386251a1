"""``refimpl bench`` end to end on a tiny load (lesson 13).

The bench starts both servers as subprocesses on 127.0.0.1, drives them with
its own client and writes a JSON report.  Timings differ on every machine, so
these tests check only what must be exact: the report's shape, the token
counts, and that the servers were really measured (CPU time is read).
"""

from __future__ import annotations

import argparse
import json
import os

import pytest

from refimpl import bench, benchload

FIELDS = {
    "tokens_per_s",
    "cpu_us_per_token",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "e2e_ms_p50",
    "client_reads",
}


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


async def test_bench_measures_both_servers_with_exact_token_counts(tmp_path):
    out = tmp_path / "result.json"
    args = bench_args("--streams", "2", "--tokens", "50", "--timeout", "60", "--json", str(out))
    assert await bench.run(args) == 0
    result = json.loads(out.read_text())
    assert result["config"] == {
        "streams": 2,
        "tokens": 50,
        "itl_ms": 0.0,
        "ttft_ms": 0,
        "repeat": 1,
        "fastwrite": True,
        "batch_tokens": 64,
    }
    assert result["command"] == "refimpl bench --streams 2 --tokens 50 --itl-ms 0 --repeat 1"
    assert result["machine"]["cpus"] == os.cpu_count()
    assert [r["server"] for r in result["runs"]] == ["refimpl", "peer"]
    for run in result["runs"]:
        assert run["tokens"] == 2 * 50 and run["errors"] == []
        assert run.keys() >= FIELDS
        # schedstat counts in nanoseconds: even 100 tokens cost measurable CPU,
        # and the per-token figure is that CPU over exactly those tokens.
        assert run["server_cpu_s"] > 0
        # (Both are rounded, server_cpu_s to the microsecond: 0.005 µs per token here.)
        per_token = run["server_cpu_s"] / 100 * 1e6
        assert run["cpu_us_per_token"] == pytest.approx(per_token, abs=0.006)
    for kind, run in zip(("refimpl", "peer"), result["runs"], strict=True):
        # One run each: the summary's medians are that run's own numbers.
        assert result["summary"][kind] == {"runs": 1, "tokens": 100, **{m: run[m] for m in bench.METRICS}}
    refimpl, peer = (result["summary"][k]["cpu_us_per_token"] for k in ("refimpl", "peer"))
    assert result["ratio_cpu_us_per_token"] == round(refimpl / peer, 3)


async def test_repeat_alternates_the_order_and_takes_the_median(tmp_path):
    out = tmp_path / "result.json"
    args = bench_args(
        "--streams",
        "1",
        "--tokens",
        "20",
        "--repeat",
        "2",
        "--only",
        "refimpl",
        "--no-fastwrite",
        "--json",
        str(out),
    )
    assert await bench.run(args) == 0
    result = json.loads(out.read_text())
    assert [r["server"] for r in result["runs"]] == ["refimpl", "refimpl"]
    assert list(result["summary"]) == ["refimpl"] and result["ratio_cpu_us_per_token"] is None
    assert result["summary"]["refimpl"]["runs"] == 2 and result["config"]["fastwrite"] is False
    assert result["command"].endswith("--only refimpl --no-fastwrite")


def test_cpu_seconds_reads_this_process():
    assert benchload.cpu_seconds(os.getpid()) > 0  # the interpreter has run a while


def test_percentile_interpolates_between_ranks():
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile(list(map(float, range(101))), 99) == 99.0
