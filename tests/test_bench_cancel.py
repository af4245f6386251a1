"""``refimpl bench cancel`` end to end on a small count (lesson 09).

The command runs as users run it, a real subprocess with its own in-process
server on loopback.  What is checked is the report's shape and that every
disconnect was seen by the server as ``cancelled(client_disconnect)``; the
latencies themselves are measurements, so no test asserts their values.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from refimpl import bench, bench_cancel

COUNT = 20


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_keeps_its_options_and_gains_a_cancel_subcommand():
    plain = parse("--streams", "2", "--tokens", "50")
    assert plain.run is bench.run and (plain.streams, plain.tokens) == ([2], 50)
    assert plain.scenario is None
    cancel = parse("cancel", "--count", "7")
    assert cancel.run is bench_cancel.run and cancel.count == 7 and cancel.json is None
    assert parse("cancel").count == 1000


async def test_every_disconnect_is_seen_as_a_client_disconnect(tmp_path):
    out = tmp_path / "cancel.json"
    cmd = [sys.executable, "-m", "refimpl", "bench", "cancel", "--count", str(COUNT), "--json", str(out)]
    with trio.fail_after(120):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    stdout = done.stdout.decode()
    assert f"{COUNT}/{COUNT}" in stdout and f"results: {out}" in stdout
    result = json.loads(out.read_text())
    assert result["command"] == f"refimpl bench cancel --count {COUNT}"
    assert result["config"]["count"] == COUNT and {"cpus", "versions"} <= set(result["machine"])
    assert list(result["summary"]) == list(bench_cancel.SCENARIOS) == list(result["samples"])
    for name, summary in result["summary"].items():
        samples = result["samples"][name]
        assert len(samples) == summary["disconnects"] == COUNT
        assert summary["outcomes"] == {"cancelled(client_disconnect)": COUNT}
        assert all(s["outcome"] == "cancelled(client_disconnect)" for s in samples)
        assert all(isinstance(s["latency_ms"], float) and s["latency_ms"] >= 0 for s in samples)
        assert all(s["tokens_at_end"] >= s["received"] for s in samples)
        for key in ("latency_ms_p50", "latency_ms_p99", "latency_ms_max", "tokens_after_leaving_max"):
            assert summary[key] is not None
    # The client left after the first content token, or before any came.
    assert all(s["received"] >= 1 for s in result["samples"]["mid-stream"])
    assert all(s["tokens_at_end"] == 0 for s in result["samples"]["before the first token"])
    # Left while queued: the model never started, so it made nothing.
    assert all(s["tokens_at_end"] == 0 for s in result["samples"]["while queued"])
