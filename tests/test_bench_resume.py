"""``refimpl bench resume`` end to end on a tiny run (lesson 11, "What Redis costs, measured").

The command runs as users run it: a subprocess that starts its own
``redis-server`` and three ``refimpl serve`` processes on loopback.  What is
checked is the report's shape and what holds on any machine: every figure
is there and positive, percentiles come in order, the stamps of the mirror
phase cover every event, and a resumable event is longer on the wire by its
``id:`` line.  The timings themselves are measurements, so no test asserts
their values.  Lesson 11's table must be what its committed JSON renders to.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import trio
from cluster_fixtures import require

from refimpl import bench, bench_resume
from refimpl.bench_protocols_report import END, ROOT, generated
from refimpl.bench_resume_report import BEGIN, COLUMNS, DATA, LESSON, ROWS, markdown_table, write_lesson
from refimpl.examples.redis_server import find_redis

QUICK = bench_resume.QUICK


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_the_options_quick_and_the_command_line():
    args = parse("resume")
    assert args.run is bench_resume.run and bench_resume.settings(args) == bench_resume.Settings()
    assert bench_resume.settings(parse("resume", "--quick")) == QUICK
    assert bench_resume.settings(parse("resume", "--quick", "--kept", "15")).kept == 15
    line = bench_resume.command_line(QUICK)
    assert bench_resume.settings(parse(*line.split()[2:])) == QUICK  # the command repeats the run
    with pytest.raises(SystemExit):
        bench_resume.settings(parse("resume", "--kept", "201"))


async def test_a_quick_run_reports_every_figure(tmp_path):
    require(find_redis)
    out = tmp_path / "resume"
    cmd = [sys.executable, "-m", "refimpl", "bench", "resume", "--quick", "--out", str(out)]
    with trio.fail_after(120):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads((out / "results.json").read_text())
    assert result["command"] == bench_resume.command_line(QUICK) and result["config"]["kept"] == QUICK.kept
    assert {"cpus", "versions", "loadavg_1min"} <= set(result["machine"])
    assert result["machine"]["versions"]["redis-server"] and result["machine"]["versions"]["coredis"]
    figures = result["columns"]
    assert list(figures) == list(COLUMNS)
    plain, memory, redis = (figures[c] for c in COLUMNS)
    for f in figures.values():
        assert f["tokens"] == QUICK.streams * QUICK.tokens
        assert f["server_cpu_us_per_token"] > 0 and f["first_token_ms_p50"] > 0
        assert 0 < f["itl_ms_p50"] <= f["itl_ms_p99"]
        assert isinstance(f["rss_kib_per_kept"], float)  # RSS may not grow for a few small ones
    assert redis["redis_cpu_us_per_token"] > 0 and redis["mirror_cpu_us_per_token"] > 0
    assert 0 < redis["through_redis_ms_p50"] <= redis["through_redis_ms_p99"] <= redis["through_redis_ms_max"]
    # The events B counted: those A got after B's answer began, at most every event of every stream.
    assert 0 < redis["through_redis_events"] <= QUICK.streams * (QUICK.tokens + 4)
    for f, kinds in ((memory, ["same"]), (redis, ["same", "other"])):
        for kind in kinds:
            assert 0 < f[f"resume_{kind}_ms_p50"] <= f[f"resume_{kind}_ms_p99"]
    assert 0 < plain["models_ms_p50"] <= plain["models_ms_p99"]
    # The same chunks, each behind an "id: N" line when resumable (ids of 1-2 digits here).
    assert memory["wire_bytes_per_event"] == redis["wire_bytes_per_event"] > plain["wire_bytes_per_event"]
    assert redis["redis_kib_per_kept"] > 0 and redis["redis_bytes_one_log"] > 0
    assert redis["redis_bytes_per_event"] >= redis["wire_bytes_per_event"]  # the event, and the stream's own
    table = (out / "results.md").read_text()
    assert table == markdown_table(result) + "\n" and table in done.stdout.decode()
    assert all(f"| {label} |" in table for label, _ in ROWS)

    # --write-lesson: the JSON, and the table between the markers, twice the same.
    (tmp_path / "lessons").mkdir()
    begin, end = BEGIN.format(data=DATA.as_posix(), name="table"), END.format(name="table")
    text = f"# 11 · a lesson\n\nBefore.\n\n{begin}\n| an old | table |\n{end}\n\nAfter.\n"
    (tmp_path / LESSON).write_text(text)
    for _ in range(2):
        assert write_lesson(result, root=tmp_path) == [tmp_path / DATA, tmp_path / LESSON]
        assert (tmp_path / LESSON).read_text() == text.replace("| an old | table |", markdown_table(result))
    assert json.loads((tmp_path / DATA).read_text()) == result
    (tmp_path / LESSON).write_text("# 11 · no table\n")  # no markers: the lesson is left alone
    assert write_lesson(result, root=tmp_path) == [tmp_path / DATA]
    assert (tmp_path / LESSON).read_text() == "# 11 · no table\n"


def test_the_lessons_table_is_the_committed_run():
    if not (ROOT / DATA).is_file():
        pytest.skip(f"no {DATA} yet: run `refimpl bench resume --write-lesson`")
    result = json.loads((ROOT / DATA).read_text())
    assert bench_resume.settings(parse(*result["command"].split()[2:])) == bench_resume.Settings()
    blocks = {"table": markdown_table(result)}
    assert generated((ROOT / LESSON).read_text(), ["table"], BEGIN, DATA) == blocks, (
        "run `.venv/bin/python -m refimpl.bench_resume_report` to draw it again from the JSON,"
        " or `.venv/bin/refimpl bench resume --write-lesson` to measure again"
    )
