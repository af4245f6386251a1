"""``refimpl bench protocols`` end to end on a tiny workload (lesson 12).

One run serves every test: a real ``refimpl serve`` subprocess, the real
load-generator process, every protocol, every phase, but small (2 streams
of 5 tokens, 3 open streams, 2 set-ups and hang-ups, a half-second stall).
Timings differ on every machine, so what is checked is what must hold on
any: every protocol has every figure, token counts are exact, the kernel's
byte counts and the server's CPU were read, every hang-up ended its
generation, and the table, the JSON and the plots agree.  The parts that are
pure functions (the ``ss`` parser, the clock offset) are checked exactly.

Lesson 12's table is generated (``--write-lesson``): the last tests render
it again from the committed JSON and fail when the lesson's differs, so its
numbers cannot be edited by hand or drift from the run they came from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import trio
from PIL import Image

from refimpl import bench, bench_protocols, bench_protocols_report
from refimpl.bench_protocol_clients import PROTOCOLS
from refimpl.bench_protocols import clock_offset, command_line, parse_ss, settings
from refimpl.bench_protocols_report import ROWS, generated, lesson_blocks, markdown_table, write_lesson

ROOT = Path(__file__).resolve().parent.parent

SMALL = ("--streams", "2", "--tokens", "5", "--ttft-ms", "5", "--itl-ms", "2", "--hold-streams", "3")
SMALL += ("--setup-count", "2", "--stall-seconds", "0.5", "--stall-tokens", "20000")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocols")
    args = parse("protocols", *SMALL, "--out", str(out))
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = trio.run(args.run, args)
    return out, code, stdout.getvalue(), json.loads((out / "results.json").read_text())


def test_every_protocol_streamed_every_token(measured):
    _, code, _, result = measured
    assert code == 0, {p: f["error_messages"] for p, f in result["protocols"].items()}
    assert list(result["protocols"]) == list(PROTOCOLS) == ["sse-h1", "sse-h2", "ws", "grpc", "connect"]
    for name, f in result["protocols"].items():
        assert f["tokens"] == f["tokens_asked"] == 2 * 5 and f["errors"] == 0, name
        samples = result["samples"][name]
        assert len(samples["ttft"]) == 2 and len(samples["itl"]) == 2 * 4, name  # per stream, per gap


def test_every_protocol_has_every_figure(measured):
    _, _, _, result = measured
    for name, f in result["protocols"].items():
        for _, keys in ROWS:
            for key in keys.split():
                assert f[key] is not None, (name, key)
        # The kernel counted bytes both ways, and the server's CPU was read.
        assert f["bytes_per_token"] > 0 and f["bytes_up_per_stream"] > 0, name
        assert f["server_cpu_us_per_token"] > 0 and f["client_cpu_us_per_token"] > 0, name
        assert f["connections"] == (1 if PROTOCOLS[name].multiplexed else 2), name
        assert f["first_token_new_connection_ms_p50"] > 0 and f["first_token_warm_connection_ms_p50"] > 0
        assert f["server_cpu_us_per_stream_new_connection"] > 0, name
        assert isinstance(f["rss_kib_per_stream"], float), name
        assert f["stall_received"] >= 1 and f["stall_tokens_made"] >= f["stall_received"], name
        assert len(result["samples"][name]["stall"]) == 5  # a reading every 0.1 s for 0.5 s


def test_every_hang_up_ended_its_generation(measured):
    """The trace's last event is ``cancelled`` for every disconnect; only
    httpx's HTTP/2 needed the connection closed (httpcore forgets a stream
    without resetting it), and the latency is on the server's clock."""
    _, _, _, result = measured
    assert result["clock_uncertainty_ms"] >= 0
    for name, f in result["protocols"].items():
        assert sum(f["disconnect_ends"].values()) == 2, name
        assert all(end.startswith("cancelled(") for end in f["disconnect_ends"]), (name, f["disconnect_ends"])
        assert f["hang_ups_not_seen"] == (2 if name == "sse-h2" else 0), name
        assert f["disconnect_tokens_after_max"] >= 0 and f["disconnect_ms_p50"] is not None, name


def test_the_table_the_plot_and_the_command(measured):
    out, _, stdout, result = measured
    table = (out / "results.md").read_text()
    assert table.strip() == markdown_table(result) and table.strip() in stdout
    head, _, *rows = table.splitlines()
    assert head == "| | " + " | ".join(PROTOCOLS) + " |"
    assert [row.split(" | ")[0] for row in rows[: len(ROWS)]] == [f"| {label}" for label, _ in ROWS]
    assert all(row.count(" | ") == len(PROTOCOLS) for row in rows[: len(ROWS)])
    assert result["plots"] == ["protocols.png", "stalled-reader.png"]
    for name in result["plots"]:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 100
            png.verify()
    # The command in the results repeats the run.
    again = result["command"].split()
    assert again[:3] == ["refimpl", "bench", "protocols"]
    assert settings(parse(*again[2:])) == settings(parse("protocols", *SMALL))


# -- the parts ------------------------------------------------------------------------------
def test_the_command_is_a_scenario_of_refimpl_bench():
    args = parse("protocols")
    assert args.run is bench_protocols.run and settings(args) == bench_protocols.Settings()
    assert command_line(settings(args)).startswith(
        "refimpl bench protocols --protocols sse-h1 sse-h2 ws grpc"
    )
    assert settings(parse("protocols", "--protocols", "ws", "ws", "grpc")).protocols == ("ws", "grpc")
    for bad in (["--streams", "0"], ["--itl-ms", "-1"], ["--hold-streams", "1001"], ["--stall-seconds", "0"]):
        with pytest.raises(SystemExit):
            settings(parse("protocols", *bad))


SS = """\
0      0      127.0.0.1:50010 127.0.0.1:8000 users:(("python",pid=41,fd=9))
\t cubic wscale:7,7 rto:204 bytes_sent:120 bytes_acked:121 bytes_received:5000 segs_out:5
0      0      127.0.0.1:50011 127.0.0.1:8000 users:(("nginx",pid=7,fd=4))
\t cubic bytes_sent:9 bytes_received:9
0      0      127.0.0.1:50012 127.0.0.1:8000 users:(("python",pid=41,fd=10))
\t cubic wscale:7,7 rto:204 bytes_acked:1 segs_out:1
"""


def test_ss_is_read_per_socket_of_one_process():
    # (A socket that has sent nothing has no bytes_sent field at all.)
    assert parse_ss(SS, 41) == {"127.0.0.1:50010": (120, 5000), "127.0.0.1:50012": (0, 0)}
    assert parse_ss(SS, 4) == {}  # pid=4 is not pid=41


def test_the_clock_offset_is_bounded_from_both_sides():
    """Server clock = client clock + 100 s; each sample bounds it: the request
    was sent before ``accepted``, the first token came after ``first_token``."""

    def sample(sent: float, accepted: float, first_token: float, first: float) -> dict:
        events = [
            {"name": "accepted", "at": 100 + accepted},
            {"name": "first_token", "at": 100 + first_token},
        ]
        return {"sent": sent, "first": first, "events": events}

    samples = [sample(1.0, 1.003, 1.004, 1.006), sample(2.0, 2.001, 2.002, 2.0045)]
    offset, uncertainty = clock_offset(samples)
    # At most 100 + 0.001 (the second sample's request), at least 100 - 0.002 (the first's token).
    assert offset == pytest.approx(100 - 0.0005) and uncertainty == pytest.approx(0.0015)


# -- lesson 12's table: generated, committed, checked ---------------------------------------------
LESSON = ROOT / bench_protocols_report.LESSON
DATA = ROOT / bench_protocols_report.DATA
REGENERATE = (
    "run `.venv/bin/python -m refimpl.bench_protocols_report` to draw it again from the JSON,"
    " or `.venv/bin/refimpl bench protocols --write-lesson` to measure again"
)


def test_the_lessons_table_is_the_committed_run():
    """Lesson 12's table is exactly what the committed JSON renders to; the
    run is the bench's default, complete, and its figures are committed."""
    result = json.loads(DATA.read_text())
    blocks = lesson_blocks(result)
    assert generated(LESSON.read_text(), list(blocks)) == blocks, REGENERATE
    assert settings(parse(*result["command"].split()[2:])) == bench_protocols.Settings()
    for name, f in result["protocols"].items():
        assert f["tokens"] == f["tokens_asked"] and f["errors"] == 0, name
    for path in bench_protocols_report.IMAGES.values():
        with Image.open(ROOT / path) as png:
            png.verify()
        assert f"]({path.relative_to('lessons')})" in LESSON.read_text(), f"the lesson does not show {path}"


def test_write_lesson_rewrites_the_blocks_and_nothing_else(measured, tmp_path):
    _, _, _, result = measured
    begin = bench_protocols_report.BEGIN.format(data=bench_protocols_report.DATA.as_posix(), name="table")
    end = bench_protocols_report.END.format(name="table")
    text = f"# 12 · a lesson\n\nBefore.\n\n{begin}\n| an old | table |\n{end}\n\nAfter.\n"
    (tmp_path / "lessons").mkdir()
    (tmp_path / bench_protocols_report.LESSON).write_text(text)
    for _ in range(2):  # the second time finds the first's output and replaces it the same way
        written = write_lesson(result, root=tmp_path)
        lesson = (tmp_path / bench_protocols_report.LESSON).read_text()
        assert lesson == text.replace("| an old | table |", markdown_table(result))
    kept = json.loads((tmp_path / bench_protocols_report.DATA).read_text())
    assert kept["protocols"] == result["protocols"] and kept["command"] == result["command"]
    assert {p: list(s) for p, s in kept["samples"].items()} == {p: ["stall"] for p in PROTOCOLS}
    assert sorted(p.relative_to(tmp_path) for p in written[1:-1]) == sorted(
        bench_protocols_report.IMAGES.values()
    )
    # A lesson without the markers is an error, not a silent no-op.
    (tmp_path / bench_protocols_report.LESSON).write_text("# 12 · no table\n")
    with pytest.raises(LookupError, match="no block 'table'"):
        write_lesson(result, root=tmp_path)
    shutil.rmtree(tmp_path / "lessons")
    with pytest.raises(SystemExit):
        write_lesson(result, root=tmp_path)


def test_write_lesson_takes_only_the_default_run():
    args = parse("protocols", "--streams", "2", "--write-lesson")
    with pytest.raises(SystemExit, match="--write-lesson"):
        trio.run(args.run, args)
