"""``refimpl bench backpressure``: the memory proof of lesson 10, on real servers and sockets.

One measurement serves every test here: six server processes (three
policies, two protocols), each with a raw client whose 4 KiB receive buffer
stops taking a 200,000-token stream at ``itl_ms 0``, sampled for 10 s.  The
10 s are the measurement (RSS over a period), not a wait for something to
happen; no assertion is about how long anything took.
"""

from __future__ import annotations

import argparse

import pytest
import trio

from refimpl import bench, bench_backpressure
from refimpl.bench_backpressure import BASE_LIMIT_KIB, Case, coalesce_cap_kib, measure

TOKENS = 200_000
CAP = 4096


@pytest.fixture(scope="module")
def cases() -> dict[tuple[str, str], Case]:
    measured = trio.run(measure)  # the defaults are the numbers
    return {(c.policy, c.protocol): c for c in measured}


def test_every_policy_over_both_protocols_was_measured(cases):
    assert list(cases) == [(p, q) for p in ("pause", "coalesce", "disconnect") for q in ("sse", "ws")]
    for c in cases.values():
        assert len(c.samples) == 40 and [t for t, _ in c.samples] == sorted(t for t, _ in c.samples)
        assert c.tokens_received >= 1  # it stopped after its first content token, not before


def test_memory_stays_under_the_limit(cases):
    for (policy, protocol), c in cases.items():
        assert c.ok, (policy, protocol, c.growth_kib, c.limit_kib, c.trace_events)
        assert c.growth_kib < c.limit_kib, (policy, protocol, c.samples)
        # Also from the idle server (before the request), so that what the
        # model made before the client stopped is counted too.
        assert max(kib for _, kib in c.samples) - c.idle_kib < c.limit_kib, (policy, protocol, c.idle_kib)


def test_the_coalesce_limit_is_one_mib_plus_a_full_buffer(cases):
    cap_kib = coalesce_cap_kib(CAP)
    assert CAP * 8 // 1024 < cap_kib < CAP // 2  # more than the list's slots, less than 512 B a token
    assert cases["coalesce", "sse"].limit_kib == BASE_LIMIT_KIB + cap_kib
    assert cases["pause", "ws"].limit_kib == cases["disconnect", "sse"].limit_kib == BASE_LIMIT_KIB


def test_the_trace_says_why_the_model_stood_still(cases):
    for (policy, protocol), c in cases.items():
        details = {e["detail"] for e in c.trace if e["name"] == "paused"}
        expected = "buffer_full" if policy == "coalesce" else "write_blocked"
        assert details == {expected}, (policy, protocol, c.trace)


def test_coalesce_ran_ahead_by_the_cap_and_stopped_there(cases):
    for protocol in ("sse", "ws"):
        c = cases["coalesce", protocol]
        # The client holds what it read; the cap is pending in the server;
        # whatever is between sits in the socket buffers or the blocked write.
        assert c.tokens_made - c.tokens_received >= CAP, (protocol, c.tokens_made, c.tokens_received)
        # The model stood at a full buffer for the rest of the window: a
        # buffer_full pause at exactly the count it ended the window with.
        full = [e["tokens"] for e in c.trace if e["detail"] == "buffer_full"]
        assert c.tokens_made in full, (protocol, c.tokens_made, full)


def test_pause_and_disconnect_stopped_the_model(cases):
    for policy in ("pause", "disconnect"):
        for protocol in ("sse", "ws"):
            c = cases[policy, protocol]
            # What it made fits in the socket buffers; the rest was never made.
            assert c.tokens_received <= c.tokens_made < TOKENS // 10, (policy, protocol, c.tokens_made)


def test_the_table_has_a_row_per_case(cases):
    lines = bench_backpressure.table(list(cases.values())).splitlines()
    assert len(lines) == 1 + len(cases)
    for line, c in zip(lines[1:], cases.values(), strict=True):
        assert line.split()[:2] == [c.policy, c.protocol] and " yes " in line


# -- the command line ---------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refimpl")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_the_command_parses_and_keeps_its_siblings(capsys):
    args = parse("backpressure")
    assert args.run is bench_backpressure.run
    assert (args.seconds, args.tokens, args.rcvbuf, args.coalesce_max_tokens) == (10.0, TOKENS, 4096, CAP)
    assert args.policies == ["pause", "coalesce", "disconnect"] and args.protocols == ["sse", "ws"]
    args = parse("backpressure", "--seconds", "2", "--policies", "coalesce", "--protocols", "ws")
    assert (args.seconds, args.policies, args.protocols) == (2.0, ["coalesce"], ["ws"])
    assert bench_backpressure.command_line(args).startswith("refimpl bench backpressure --seconds 2 ")
    assert parse("cancel").run is not bench_backpressure.run and parse().scenario is None
    with pytest.raises(SystemExit) as exit_:
        parse("backpressure", "--help")
    assert exit_.value.code == 0 and "--coalesce-max-tokens" in capsys.readouterr().out
