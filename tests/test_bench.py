"""``refimpl bench`` end to end on a tiny load, and its parts (lesson 13).

The bench starts each server as a subprocess on 127.0.0.1, drives it from
load-generator processes and writes a results folder.  Timings differ on
every machine, so these tests check only what must be exact: the report's
shape, the token counts, the command line, and that the servers were
really measured (their CPU time is read).  The scenarios other than
``overhead`` have their smoke runs in ``test_bench_scenarios.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest
import trio

from refimpl import bench, bench_backpressure, bench_cancel, benchload
from refimpl.bench_client import Lines, shares
from refimpl.bench_report import ROWS, percentile
from refimpl.bench_scenarios import SCENARIOS, Settings, settings
from refimpl.benchload import Load, Plan


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


async def test_bench_measures_both_servers_with_exact_token_counts(tmp_path):
    args = parse("--streams", "2", "--tokens", "50", "--timeout", "60", "--out", str(tmp_path))
    assert await bench.run(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"] == {
        "scenario": "overhead",
        "streams": [2],
        "tokens": 50,
        "ttft_ms": 0,
        "itl_ms": 0,
        "servers": ["refimpl", "sse-starlette"],
        "repeat": 1,
        "load_procs": 1,
        "fastwrite": True,
        "batch_tokens": 64,
        "workers": [1],
        "backlog": None,
        "timeout": 60.0,
        "variants": {"refimpl": ["refimpl", 1], "sse-starlette": ["sse-starlette", 1]},
        "baseline": "sse-starlette",
    }
    assert result["command"] == (
        "refimpl bench overhead --streams 2 --tokens 50 --ttft-ms 0 --itl-ms 0"
        " --servers refimpl sse-starlette --repeat 1 --load-procs 1"
    )
    assert result["machine"]["cpus"] == os.cpu_count()
    assert [r["server"] for r in result["runs"]] == ["refimpl", "sse-starlette"]
    for run in result["runs"]:
        assert run["tokens"] == 2 * 50 and run["errors"] == 0 and run["error_messages"] == []
        assert run["workers"] == 1 and len(run["server_pids"]) == 1  # one process, no children
        assert run.keys() >= {key for _, key, _, _ in ROWS}
        # schedstat counts in nanoseconds: even 100 tokens cost measurable CPU,
        # and the per-token figure is that CPU over exactly those tokens.
        assert run["server_cpu_s"] > 0
        # (Both are rounded, server_cpu_s to the microsecond: 0.005 µs per token here.)
        per_token = run["server_cpu_s"] / 100 * 1e6
        assert run["cpu_us_per_token"] == pytest.approx(per_token, abs=0.006)
    summary = result["summary"]["2"]
    for run in result["runs"]:
        # One run each: the summary's medians are that run's own numbers.
        assert summary[run["server"]] == {
            "runs": 1,
            **{key: run[key] for _, key, _, _ in ROWS},
            "ratio": summary[run["server"]]["ratio"],
        }
    refimpl, peer = (summary[k]["cpu_us_per_token"] for k in ("refimpl", "sse-starlette"))
    assert summary["refimpl"]["ratio"]["cpu_us_per_token"] == round(refimpl / peer, 3)
    assert result["plots"] == ["latency.png"]  # one --streams: no plot over concurrency


async def test_repeat_alternates_the_order_and_takes_the_median(tmp_path):
    args = parse(
        *("--streams", "1", "--tokens", "20", "--repeat", "2", "--servers", "refimpl", "--no-fastwrite"),
        *("--out", str(tmp_path)),
    )
    assert await bench.run(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["server"], r["run"]) for r in result["runs"]] == [("refimpl", 1), ("refimpl", 2)]
    assert list(result["summary"]["1"]) == ["refimpl"]
    # No baseline among the servers: there is nothing to take a ratio to.
    assert set(result["summary"]["1"]["refimpl"]["ratio"].values()) == {None}
    assert result["summary"]["1"]["refimpl"]["runs"] == 2 and result["config"]["fastwrite"] is False
    assert result["command"].endswith("--servers refimpl --repeat 2 --load-procs 1 --no-fastwrite")


# -- the command line ------------------------------------------------------------------
def test_each_scenario_has_its_defaults_and_an_option_given_anywhere_wins():
    assert settings(parse()) == SCENARIOS["overhead"]
    assert settings(parse("paced")) == Settings("paced", (200,), 200, 200, 20)
    assert settings(parse("burst")).streams == (500,)
    # Before the scenario's name or after it, an option is kept.
    assert settings(parse("--tokens", "50", "paced")).tokens == 50
    given = settings(
        parse("paced", "--streams", "200", "1000", "200", "--ttft-ms", "0", "--servers", "starlette")
    )
    assert (given.streams, given.ttft_ms, given.itl_ms, given.servers) == ((200, 1000), 0, 20, ("starlette",))
    workers = settings(parse("burst", "--workers", "1", "2", "2", "--backlog", "64"))
    assert (workers.workers, workers.backlog) == ((1, 2), 64)
    assert list(workers.variants()) == ["refimpl", "refimpl×2", "sse-starlette"]
    assert workers.variants()["refimpl×2"] == ("refimpl", 2)
    for bad in (
        ["--streams", "0"],
        ["--load-procs", "3", "--streams", "2"],
        ["--itl-ms", "-1"],
        ["--workers", "0"],
        ["--backlog", "0"],
        ["--workers", "2", "--servers", "sse-starlette"],  # the peers run one process
    ):
        with pytest.raises(SystemExit):
            settings(parse("paced", *bad))


def test_the_results_command_repeats_the_run():
    args = parse(
        *("burst", "--streams", "8", "16", "--load-procs", "2", "--batch-tokens", "1", "--no-fastwrite"),
        *("--workers", "1", "2", "--backlog", "64"),
    )
    s = settings(args)
    again = bench.command_line(s).split()
    assert again[:3] == ["refimpl", "bench", "burst"]
    assert settings(parse(*again[2:])) == s


def test_the_other_measurements_keep_their_commands_and_gain_the_issues_names():
    assert parse("cancel").run is parse("disconnect").run is bench_cancel.run
    assert parse("backpressure").run is parse("stalled").run is bench_backpressure.run
    assert parse("paced").run is parse().run is bench.run


# -- the parts -----------------------------------------------------------------------------
def test_streams_split_over_load_processes_evenly_and_numbered_on():
    split = shares(Plan(streams=7, tokens=3, itl_ms=20), 3)
    assert [(p.streams, p.first) for p in split] == [(3, 0), (2, 3), (2, 5)]
    assert {(p.tokens, p.itl_ms) for p in split} == {(3, 20)}


class Chunks(trio.abc.ReceiveStream):
    """A stream that returns these chunks, then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        pass


async def test_a_load_processs_lines_come_whole_however_the_pipe_cuts_them():
    objects = [{"ready": 7}, {"tokens": 12}, {"load": {"itl": [0.02, 0.021]}, "lag": []}]
    out = b"".join(json.dumps(o).encode() + b"\n" for o in objects)
    cuts = [[out[:i], out[i:]] for i in range(1, len(out))] + [[out[i : i + 1] for i in range(len(out))]]
    for chunks in cuts:
        lines = Lines(Chunks(chunks))
        assert [await lines.next() for _ in objects] == objects
        assert await lines.next() is None  # the end of its output


def test_loads_merge_into_one():
    a = Load(started=1.0, ended=3.0, cpu_s=0.5, tokens=2, reads=2, ttft=[0.1], itl=[0.02])
    b = Load(
        started=0.5, ended=2.0, cpu_s=0.25, tokens=3, reads=1, setup_failures=1, errors=["x"], itl=[0.03]
    )
    m = Load.merge([a, b])
    assert (m.started, m.ended, m.cpu_s, m.tokens, m.reads, m.setup_failures) == (0.5, 3.0, 0.75, 5, 3, 1)
    assert (m.ttft, m.itl, m.errors) == ([0.1], [0.02, 0.03], ["x"])


def test_the_kernel_readings_of_this_process():
    assert benchload.cpu_seconds(os.getpid()) > 0  # the interpreter has run a while
    rss, peak = benchload.memory_kib(os.getpid())
    assert 0 < rss <= peak
    assert benchload.listen_overflows() >= 0


def test_the_readings_of_a_process_tree_are_sums_over_it():
    """A child and its grandchild (``sh`` starting ``sleep``): the tree holds
    both below this process, parents first, and the readings add them up."""
    cmd = ["sh", "-c", "sleep 30 & echo $!; wait"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
        try:
            grandchild = int(child.stdout.readline())
            tree = benchload.process_tree(os.getpid())
            assert tree[0] == os.getpid() and tree.index(child.pid) < tree.index(grandchild)
            assert benchload.process_tree(child.pid) == [child.pid, grandchild]
            me, family = os.getpid(), (os.getpid(), child.pid, grandchild)
            assert benchload.cpu_seconds(*family) == pytest.approx(
                sum(map(benchload.cpu_seconds, family)), abs=0.01
            )
            assert benchload.memory_kib(*family)[0] > benchload.memory_kib(me)[0]
        finally:
            child.kill()
            os.kill(grandchild, 9)


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert bench.percentile is percentile  # where bench_cancel and the exercises find it
