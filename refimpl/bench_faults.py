"""``refimpl bench faults``: many misbehaving clients at once against one server (lesson 14).

Strategy
--------
Each error case of this project has its own test, one fault at a time.  In
production they come together: while one client reads its stream politely,
another hangs up mid-stream, a third sends garbage, a fourth trickles its
headers in a byte a second.  A fault that is handled alone can still leak
under company -- a generation nobody cancels, a connection nobody closes,
a traceback in a code path only a race reaches.  So this command runs
``--clients`` clients for ``--seconds``, each of one kind from
``bench_fault_clients.py`` (round robin over the kinds), each starting its
fault again as soon as the last one ended, against ONE server, and then
checks the invariants a production server owes its operators:

1. every normal stream (SSE, the openai SDK, WebSocket) is complete:
   ``[DONE]`` or ``done``, a ``finish_reason``, the usage;
2. every failure a client saw is documented: a status of DESIGN §2 in the
   OpenAI error shape, or an error code of ``patterns/errors.py``'s
   ``FAILURES`` in the stream, or the close the issue asks for (a request
   that never completes: 408, or closed, within the run);
3. no 5xx, anywhere;
4. no traceback in the server's log;
5. ``refimpl_active_generations`` (``/metrics``) falls back to 0: every
   stream a client left was cancelled;
6. the server is alive and as fast afterwards: a stream's first-token delay
   after the run, beside one before it (and the normal streams' during it).

One address.  Every client comes from 127.0.0.1, so the per-address limits
(``--max-streams-per-client``, ``--max-connections-per-client``) would turn
the load into 429s: the server runs with them raised to the load's size,
and the report says so.  The command starts the server as a subprocess
(``benchload.py``'s command line and readiness check) and reads its stderr
for tracebacks; ``tests/test_fault_load.py`` runs :func:`run_faults` against
an in-process server and reads its loggers instead.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from . import bench_fault_clients as clients
from .bench_client import load_processes
from .bench_knobs import add_knobs, knobs_from
from .bench_knobs import command_line as knob_line
from .bench_report import environment, ms, percentile, write_results
from .benchload import Plan as LoadPlan
from .benchload import cpu_seconds, free_port, server_command, stop, wait_until_up

LESSON_DATA = Path(__file__).resolve().parent.parent / "lessons" / "data" / "14-faults.json"
SAMPLES = 10  # normal streams before and after the run, one at a time
HANG = 60.0  # seconds any one client may take beyond the run before it counts as hung
TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)


@dataclass(frozen=True, slots=True)
class Plan:
    clients: int = 500
    seconds: float = 60.0
    tokens: int = 50
    itl_ms: float = 10.0
    drip: float = 0.5
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 20.0


HELP = {
    "clients": "clients at once, round robin over the kinds",
    "seconds": "how long the clients keep starting faults",
    "tokens": "tokens per normal stream",
    "itl_ms": "the model's delay between two tokens",
    "drip": "seconds between two bytes of a slowloris",
    "header_timeout": "the server's --header-timeout",
    "body_timeout": "the server's --body-timeout",
    "keep_alive_timeout": "the server's --keep-alive-timeout; 5, hypercorn's own, loses pooled POSTs",
}


# -- the run -----------------------------------------------------------------------------------
async def _client(run: clients.Run, kind: str, n: int, tally: Counter, bad: list[str]) -> None:
    """One client: its fault again and again until the run's deadline."""
    play, k = clients.KINDS[kind][0], 0
    while trio.current_time() < run.deadline:
        with trio.move_on_at(run.deadline + HANG) as guard:
            try:
                outcome = await play(run, n + 1009 * k)  # n % m cycles over clients and turns
            except Exception as err:  # the harness goes on; the outcome says what broke
                outcome = f"raised {type(err).__name__}: {str(err)[:120]}"
        if guard.cancelled_caught:
            outcome = "hung"
        tally[kind, outcome] += 1
        if not clients.expected(kind, outcome) and len(bad) < 50:
            bad.append(f"{kind}: {outcome}")
        k += 1
        if kind in clients.ONCE:
            return


async def _first_tokens(run: clients.Run, count: int) -> list[float]:
    """``count`` normal SSE streams one after another: their first-token delays."""
    run.ttft, outcomes = [], []
    for n in range(count):
        outcomes.append(await clients.sse(run, n))
    if outcomes.count("complete") != count:
        raise RuntimeError(f"a stream on the quiet server failed: {Counter(outcomes)}")
    return run.ttft


async def active_generations(http: httpx.AsyncClient, url: str) -> float:
    text = (await http.get(url + "/metrics")).text
    return float(re.search(r"^refimpl_active_generations (\S+)$", text, re.M).group(1))


async def settle(http: httpx.AsyncClient, url: str, within: float = 30.0) -> tuple[float, float]:
    """Wait (polling ``/metrics``: it is another process) until no generation
    runs; (the gauge's last value, seconds it took)."""
    began = trio.current_time()
    with trio.move_on_after(within):
        while await active_generations(http, url):  # noqa: ASYNC110 (no event crosses processes)
            await trio.sleep(0.05)
    return await active_generations(http, url), trio.current_time() - began


async def _into(out: list, awaitable: Awaitable) -> None:
    out.append(await awaitable)


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"n": len(samples), "p50_ms": ms(percentile(samples, 50)), "p99_ms": ms(percentile(samples, 99))}


async def probe(url: str, plan: Plan, at: float) -> list[float]:
    """First-token delays of ``SAMPLES`` normal streams at once, half-way
    through the run, from a load process of their own (``bench_client.py``):
    this process's own loop is busy with hundreds of clients, and every
    delay it stamps carries its lag."""
    async with load_processes(LoadPlan(SAMPLES, plan.tokens, 0, plan.itl_ms, timeout=60), 1) as procs:
        await procs.ready()
        await trio.sleep_until(at)
        load, _ = await procs.run(url)
    return load.ttft


async def run_faults(
    url: str,
    plan: Plan,
    tracebacks: Callable[[], list[str]],
    kinds: tuple[str, ...] = tuple(clients.KINDS),
    separate_probe: bool = False,
) -> dict[str, Any]:
    """The whole measurement against the server at ``url``; ``tracebacks()``
    returns the tracebacks its log holds so far.  With ``separate_probe``,
    also the first-token delays seen from another process during the run."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(30)) as http:
        try:  # the dev extra's; without it, no "openai" clients
            from openai import AsyncOpenAI

            sdk = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
        except ImportError:
            sdk, kinds = None, tuple(k for k in kinds if k != "openai")
        run = clients.Run(url, 0, plan.tokens, plan.itl_ms, plan.drip, http, sdk)
        before = await _first_tokens(run, SAMPLES)
        tally, bad, run.ttft = Counter(), [], []
        run.deadline = trio.current_time() + plan.seconds
        began, cpu = time.perf_counter(), time.process_time()
        probed: list[list[float]] = []
        async with trio.open_nursery() as nursery:
            for n in range(plan.clients):
                nursery.start_soon(_client, run, kinds[n % len(kinds)], n, tally, bad)
            if separate_probe:
                half_way = trio.current_time() + plan.seconds / 2
                nursery.start_soon(_into, probed, probe(url, plan, half_way))
        wall, during = time.perf_counter() - began, run.ttft
        cpu = (time.process_time() - cpu) / wall  # the clients' share of a core: near 1, they lag
        active, settled = await settle(http, url)
        traces = {}  # what the server recorded for each generation a violation names
        for gen_id in sorted({m for line in bad for m in re.findall(r"chatcmpl-\w+", line)})[:5]:
            resp = await http.get(f"{url}/v1/debug/generations/{gen_id}")
            traces[gen_id] = resp.json() if resp.status_code == 200 else resp.status_code
        after = await _first_tokens(run, SAMPLES)
    outcomes: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    for (kind, outcome), count in sorted(tally.items()):
        outcomes[kind][outcome] = count
    five = sum(c for (_, o), c in tally.items() if re.match(r"(HTTP )?5\d\d\b", o))
    found = tracebacks()
    normal = {o for kind in clients.NORMAL if kind in kinds for o in outcomes[kind]}
    return {
        "outcomes": outcomes,
        "traces": traces,
        "violations": {
            "count": sum(c for (k, o), c in tally.items() if not clients.expected(k, o)),
            "first": bad,
        },
        "first_token_ms": {
            "before": _stats(before),
            "during": _stats(during),
            **({"during, another process": _stats(probed[0])} if probed else {}),
            "after": _stats(after),
        },
        "active_after": active,
        "settled_s": round(settled, 3),
        "tracebacks": {"count": len(found), "first": found[:3]},
        "wall_s": round(wall, 2),
        "client_cpu_share": round(cpu, 2),
        "invariants": {
            "normal streams complete": normal <= {"complete"},
            "every failure documented": not bad,
            "no 5xx": five == 0,
            "no traceback in the log": not found,
            "active generations back to 0": active == 0,
            "alive and fast after": len(after) == SAMPLES,
        },
    }


# -- the command -------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "faults", help="many misbehaving clients against one server: the invariants (lesson 14)"
    )
    add_knobs(p, Plan, HELP)
    p.add_argument("--quick", action="store_true", help="the CI-sized run: " + command_line(QUICK)[21:])
    p.add_argument("--out", type=Path, default=Path("bench-results/faults"), help="the results folder")
    p.add_argument("--write-lesson", action="store_true", help=f"also write {LESSON_DATA.name} for lesson 14")
    p.set_defaults(run=run)


QUICK = Plan(clients=60, seconds=4.0, tokens=20, itl_ms=5.0, drip=0.2, header_timeout=1.0, body_timeout=1.0)


def command_line(plan: Plan) -> str:
    return knob_line("faults", plan)


def server_flags(plan: Plan) -> list[str]:
    """Every client is 127.0.0.1: the per-address limits raised to the load's
    size (else the load is 429s), the timeouts under test as asked."""
    room = str(4 * plan.clients + 64)
    return [
        *("--max-streams-per-client", room, "--max-connections-per-client", room),
        *("--max-queue", room, "--header-timeout", f"{plan.header_timeout:g}"),
        *("--body-timeout", f"{plan.body_timeout:g}"),
        *("--keep-alive-timeout", f"{plan.keep_alive_timeout:g}"),
    ]


async def with_server(plan: Plan) -> dict[str, Any]:
    """``refimpl serve`` as a subprocess, its stderr in a file; the run against it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per client, at both ends
    want = 4 * plan.clients + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard)
        )
    port = free_port()
    cmd = server_command("refimpl", port, LoadPlan(plan.clients, plan.tokens, 0, plan.itl_ms)) + server_flags(
        plan
    )
    with tempfile.TemporaryFile() as log:
        proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_until_up(proc, url, log)

            def tracebacks() -> list[str]:
                log.seek(0)
                text = log.read().decode("utf-8", "replace")
                return [text[m.start() : m.start() + 2000] for m in TRACEBACK.finditer(text)]

            cpu = cpu_seconds(proc.pid)
            result = await run_faults(url, plan, tracebacks, separate_probe=True)
            cpu = (cpu_seconds(proc.pid) - cpu) / result["wall_s"]  # (settling and the after-streams too)
            log.seek(0)
            lines = Counter(_shape(line) for line in log.read().decode("utf-8", "replace").splitlines())
            result["server"] = {
                "command": " ".join(cmd[2:]),
                "alive_at_end": proc.returncode is None,
                "cpu_share": round(
                    cpu, 2
                ),  # of one core, during the run: near 1, the server is the bottleneck
                "log_lines": dict(lines.most_common(15)),  # what the server said, ids and numbers masked
            }
            return result
        finally:
            await stop(proc, grace=15)


def _shape(line: str) -> str:
    """A log line with its time, ids and numbers masked, to count its kind."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"(chatcmpl|msg|resp)[-_]\w+", "ID", line))[:160]


def table(result: dict[str, Any]) -> str:
    """Outcomes per kind, the invariants, the first-token delays."""
    rows = ["| client kind | outcomes (count) | as documented |", "|---|---|---|"]
    for kind, outcomes in result["outcomes"].items():
        shown = ", ".join(f"{o} ({c:,})" for o, c in outcomes.items()) or "(none finished)"
        ok = all(clients.expected(kind, o) for o in outcomes)
        rows.append(f"| {kind} | {shown} | {'yes' if ok else '**no**'} |")
    rows += ["", "| invariant | held |", "|---|---|"]
    rows += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in result["invariants"].items()]
    t = result["first_token_ms"]
    rows += ["", "| normal streams' first token | n | p50 ms | p99 ms |", "|---|---|---|---|"]
    rows += [f"| {k} | {v['n']} | {v['p50_ms']} | {v['p99_ms']} |" for k, v in t.items()]
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> int:
    plan = knobs_from(args, QUICK)
    if plan.clients < len(clients.KINDS) or plan.seconds <= max(plan.header_timeout, plan.body_timeout) + 1:
        raise SystemExit(
            f"need --clients >= {len(clients.KINDS)} (one of each kind), and --seconds longer than"
            " --header-timeout and --body-timeout (+1 s), so a slowloris can be closed within the run"
        )
    print(f"faults: {plan.clients} clients for {plan.seconds:g} s ...", file=sys.stderr, flush=True)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(plan),
        "config": asdict(plan),
        "machine": environment(),
        **await with_server(plan),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_results(args.out, result)
    (args.out / "results.md").write_text(table(result) + "\n")
    print(f"{table(result)}\n\n$ {result['command']}\nresults: {path}")
    for line in result["violations"]["first"][:10]:
        print(f"violation: {line}", file=sys.stderr)
    if args.write_lesson:
        keep = (
            "date",
            "command",
            "config",
            "outcomes",
            "violations",
            "first_token_ms",
            "invariants",
            "server",
        )
        LESSON_DATA.write_text(json.dumps({k: result[k] for k in keep}, indent=1) + "\n")
        print(f"lesson: {LESSON_DATA}")
    return 0 if all(result["invariants"].values()) else 1
