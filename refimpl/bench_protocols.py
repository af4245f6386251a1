"""``refimpl bench protocols``: the seed article's "Choosing a streaming protocol" table, measured.

Strategy
--------
The seed article chose between SSE, WebSocket, gRPC streaming and HTTP/2
push with a table of adjectives; lesson 12 puts numbers in its cells.  One
``refimpl serve`` process (``benchload.running_server``), one load-generator
process (``bench_protocol_clients.py``: one harness, an adapter per
protocol), and the same workload over each protocol in turn: SSE over
HTTP/1.1 and over HTTP/2 (h2c, every stream on one connection), WebSocket,
gRPC and Connect.  HTTP/2 push is not among them: a pushed response answers
a request the client never made, so it cannot carry a stream still being
generated, and browsers have dropped it (lesson 06 has the demo).  At each
checkpoint of the load process the bench reads the server's CPU time
(``schedstat``, ``benchload.cpu_seconds``) and memory (VmRSS).  The phases:

1. **memory**: ``--hold-streams`` streams per protocol that got their first
   token and wait (a model with a 10-minute itl), kept open while the next
   protocol's open: the RSS rise over them is the memory per open stream,
   its connection included where it has one.  Stacked, and first, because
   a Python process keeps what it freed and reuses it: after another
   protocol's streams closed, a protocol would borrow their memory.
2. **paced**: ``--streams`` × ``--tokens`` at ``--ttft-ms`` / ``--itl-ms``
   on connections opened and warmed (a one-token stream each) before the
   clock.  TTFT (minus the model's: "added") and ITL are the client's
   ``perf_counter`` stamps; CPU per token is the server's from the first
   request to the last token, and the client's own (grpcio's threads too).
3. **set-up**: ``--setup-count`` one-token streams one after another, each
   on a new connection (from before the connect to the first token; the
   server's CPU includes the close), then as many on one warm connection.
4. **disconnect**: as many times: a fresh connection, a stream, a hang-up
   after its first token (each client's own way, ``bench_protocol_clients``),
   and the latency to the trace's ``cancelled``.
5. **stalled reader**: a stream at itl 0 whose client stops reading after
   its first token for ``--stall-seconds``, with the library's and kernel's
   default buffers; the server's and client's RSS and the model's tokens
   (``refimpl_tokens_total``) every 0.1 s say whether memory grows and
   whether the model stood still (nothing made in the last second).  The
   tokens made before it stood still are what the buffers on the way took:
   at itl 0 each write carries every ready token, one SSE event each but
   one WebSocket, gRPC or Connect message for all, so the same bytes of
   buffer hold far more tokens of the latter.

**Bytes on the wire** are the kernel's: ``ss -tinp`` (``tcp_info``) gives
``bytes_sent`` and ``bytes_received`` of each TCP connection of the load
process to the server's port, read when the paced streams start and when
they have ended, connections still open.  That is all of TCP's payload:
HTTP/1.1 headers and chunked framing, HTTP/2 frame headers, HPACK,
SETTINGS, WINDOW_UPDATE and PING frames (grpcio's BDP pings), WebSocket
frame headers and masks, gRPC's 5-byte prefixes, the final and usage
messages; not TCP/IP's headers.  Nothing is compressed.

**Clocks.**  The trace's stamps are ``trio.current_time()``: ``perf_counter``
plus an offset trio picks at random.  The bench bounds the offset as NTP
does, from every disconnect sample: the client stamped ``sent`` before the
trace's ``accepted`` and its first token after the trace's
``first_token``.  The narrowest bounds give the estimate and its ±.

The report (``results.md``, the figures, and ``--write-lesson``, which
commits a run to lesson 12) is ``bench_protocols_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import httpx
import trio

from .bench_client import Lines
from .bench_protocol_clients import PROTOCOLS, WARM
from .bench_protocols_report import markdown_table, write_lesson, write_plots
from .bench_report import environment, ms, percentile, write_results
from .benchload import Plan, cpu_seconds, memory_kib, process_tree, running_server

HOLD = {"tokens": 2, "ttft_ms": 0.0, "itl_ms": 600_000.0}  # a first token, then a long wait
LEAVE = {"tokens": 1000, "ttft_ms": 0.0, "itl_ms": 20.0}  # streams the client leaves
EVERY = 0.1  # seconds between two readings while a reader stalls
STEP_DEADLINE = 300.0  # seconds the load process may take to answer


@dataclass(frozen=True, slots=True)
class Settings:
    """One run's knobs: the options, with these defaults (:data:`HELP`)."""

    protocols: tuple[str, ...] = tuple(PROTOCOLS)
    streams: int = 50
    tokens: int = 200
    ttft_ms: float = 200.0
    itl_ms: float = 20.0
    hold_streams: int = 100
    setup_count: int = 20
    stall_seconds: float = 3.0
    stall_tokens: int = 1_000_000

    def simulate(self) -> dict[str, float]:
        return {"tokens": self.tokens, "ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms}


HELP = {
    "streams": "concurrent paced streams",
    "tokens": "tokens per paced stream",
    "ttft_ms": "the model's delay before the first token",
    "itl_ms": "the model's delay between two tokens",
    "hold_streams": "open streams per protocol, for the memory per stream",
    "setup_count": "set-ups of each kind, and hang-ups, per protocol",
    "stall_seconds": "how long the stalled reader reads nothing",
    "stall_tokens": "tokens the stalled stream asks for (at itl 0)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("protocols", help="one workload over SSE h1/h2, WebSocket, gRPC, Connect (lesson 12)")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    for f in fields(Settings)[1:]:
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=HELP[f.name]
        )
    p.add_argument(
        "--out", type=Path, help="the results folder, bench-results/protocols-<time>/ if not given"
    )
    p.add_argument(
        "--write-lesson",
        action="store_true",
        help="also commit the run to lesson 12 (its table, figures and lessons/data/12-protocols.json)",
    )
    p.set_defaults(run=run)


def settings(args: argparse.Namespace) -> Settings:
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    s = replace(s, protocols=tuple(dict.fromkeys(s.protocols)))
    if min(s.streams, s.tokens, s.hold_streams, s.setup_count, s.stall_tokens) < 1 or s.stall_seconds <= 0:
        raise SystemExit(
            "need --streams, --tokens, --hold-streams, --setup-count, --stall-tokens >= 1, --stall-seconds > 0"
        )
    if min(s.ttft_ms, s.itl_ms) < 0 or max(s.streams, s.hold_streams) > 1000:
        raise SystemExit("need --ttft-ms, --itl-ms >= 0 and --streams, --hold-streams <= 1,000")
    return s


def command_line(s: Settings) -> str:
    knobs = (f"--{f.name.replace('_', '-')} {getattr(s, f.name)!s}" for f in fields(Settings)[1:])
    return f"refimpl bench protocols --protocols {' '.join(s.protocols)} " + " ".join(knobs)


# -- the instruments ----------------------------------------------------------------------------
def parse_ss(text: str, pid: int) -> dict[str, tuple[int, int]]:
    """``ss -tinpH`` output -> {local address: (bytes sent, bytes received)}
    of process ``pid``'s sockets: a line per socket, its ``tcp_info`` on the
    indented line after it."""
    out: dict[str, tuple[int, int]] = {}
    local = None
    for line in text.splitlines():
        if not line[:1].isspace():  # Recv-Q Send-Q Local Peer Process
            local = line.split()[2] if f"pid={pid}," in line else None
        elif local is not None:
            counts = dict(re.findall(r"\b(bytes_sent|bytes_received):(\d+)", line))
            out[local] = (int(counts.get("bytes_sent", 0)), int(counts.get("bytes_received", 0)))
    return out


async def wire_bytes(pid: int, port: int) -> dict[str, tuple[int, int]]:
    cmd = ["ss", "-tinpH", "state", "established", "(", "dport", "=", f":{port}", ")"]
    done = await trio.run_process(cmd, capture_stdout=True, stderr=subprocess.DEVNULL)
    return parse_ss(done.stdout.decode(), pid)


def clock_offset(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """(server clock - client clock, its uncertainty), seconds: the header's bounds."""
    at = [{e["name"]: e["at"] for e in s["events"]} for s in samples]
    highest = min(a["accepted"] - s["sent"] for a, s in zip(at, samples, strict=True))
    lowest = max(a["first_token"] - s["first"] for a, s in zip(at, samples, strict=True))
    return (highest + lowest) / 2, (highest - lowest) / 2


def rss(*pids: int) -> int:
    return memory_kib(*pids)[0]


async def tokens_total(debug: httpx.AsyncClient) -> int:
    text = (await debug.get("/metrics")).raise_for_status().text
    return int(float(re.search(r"^refimpl_tokens_total (\S+)$", text, re.MULTILINE)[1]))


class LoadProcess:
    """The load generator from the bench's side: commands out; checkpoints, results in."""

    def __init__(self, proc: trio.Process, log: Any) -> None:
        self.proc, self.pid, self.lines, self.log = proc, proc.pid, Lines(proc.stdout), log

    async def next(self, expect: str) -> Any:
        with trio.fail_after(STEP_DEADLINE):
            line = await self.lines.next() or {}
        if expect not in line:
            self.log.seek(0)
            said = line.get("error") or line or self.log.read().decode()[-3000:]
            raise RuntimeError(f"the load process, waited for {expect!r}:\n{said}")
        return line[expect]

    async def send(self, **message: Any) -> None:
        await self.proc.stdin.send_all(json.dumps(message).encode() + b"\n")

    async def at(self, mark: str) -> None:
        if await self.next("at") != mark:
            raise RuntimeError(f"the load process is not at {mark!r}")

    async def call(self, phase: str, mark: str | None = None, **knobs: Any) -> Any:
        """A command; its result, or with ``mark`` once it is at that first checkpoint."""
        await self.send(phase=phase, **knobs)
        return await (self.at(mark) if mark else self.next("result"))

    async def go(self, mark: str | None = None) -> Any:
        """On from a checkpoint, to the next one (``mark``) or to the result."""
        await self.send(go=True)
        return await (self.at(mark) if mark else self.next("result"))


@asynccontextmanager
async def load_process(url: str) -> AsyncIterator[LoadProcess]:
    with tempfile.TemporaryFile() as log:
        cmd = [sys.executable, "-m", "refimpl.bench_protocol_clients", url]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
        proc = await trio.lowlevel.open_process(cmd, **pipes)
        try:
            load = LoadProcess(proc, log)
            await load.next("ready")  # imported; nothing connected yet
            yield load
        finally:
            with trio.CancelScope(shield=True):
                await proc.stdin.aclose()  # no more commands: it exits
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await proc.stdout.aclose()


# -- the phases (the module header) ---------------------------------------------------------------
async def hold(load: LoadProcess, s: Settings, pids: list[int]) -> dict[str, dict]:
    out, before = {}, rss(*pids)
    for p in s.protocols:
        await load.call("hold", "held", protocol=p, streams=s.hold_streams, simulate=HOLD)
        now = rss(*pids)
        out[p] = {"rss_kib_per_stream": round((now - before) / s.hold_streams, 2), **await load.go()}
        before = now
    await load.call("release")
    return out


async def paced(load: LoadProcess, s: Settings, p: str, pids: list[int], port: int) -> tuple[dict, dict]:
    await load.call("paced", "connected", protocol=p, streams=s.streams, simulate=s.simulate())
    cpu, wire = cpu_seconds(*pids), await wire_bytes(load.pid, port)
    await load.go("streamed")
    cpu, after = cpu_seconds(*pids) - cpu, await wire_bytes(load.pid, port)
    r = await load.go()
    # Each connection's bytes since "connected"; those that carried none (the
    # load process's connection for traces) are not the streams'.
    moved = [(a[0] - wire.get(k, (0, 0))[0], a[1] - wire.get(k, (0, 0))[1]) for k, a in after.items()]
    moved = [m for m in moved if m != (0, 0)]
    tokens, ttft = r["tokens"], [t - s.ttft_ms / 1000 for t in r["ttft"]]
    out = {"tokens": tokens, "tokens_asked": s.streams * s.tokens, "errors": len(r["errors"])}
    for q in (50, 99):
        out |= {f"ttft_added_ms_p{q}": ms(percentile(ttft, q)), f"itl_ms_p{q}": ms(percentile(r["itl"], q))}
    return out | {
        "server_cpu_us_per_token": round(cpu / tokens * 1e6, 2),
        "client_cpu_us_per_token": round(r["client_cpu_s"] / tokens * 1e6, 2),
        "bytes_per_token": round(sum(m[1] for m in moved) / tokens, 1),
        "bytes_up_per_stream": round(sum(m[0] for m in moved) / s.streams, 1),
        "connections": len(moved),
        "error_messages": r["errors"][:10],
    }, {"ttft": r["ttft"], "itl": r["itl"]}


async def setup(load: LoadProcess, s: Settings, p: str, pids: list[int]) -> dict:
    out = {}
    for fresh, kind in ((True, "new"), (False, "warm")):
        await load.call("setup", "connected", protocol=p, count=s.setup_count, fresh=fresh)
        cpu = cpu_seconds(*pids)
        await load.go("done")
        cpu = cpu_seconds(*pids) - cpu
        times = (await load.go())["first_token"]
        out[f"first_token_{kind}_connection_ms_p50"] = ms(percentile(times, 50))
        out[f"server_cpu_us_per_stream_{kind}_connection"] = round(cpu / s.setup_count * 1e6, 1)
    return out


def disconnects(samples: list[dict], offset: float) -> dict:
    """From the hang-up (or the connection's close, where the hang-up never
    reached the server) to the trace's end, on the server's clock."""
    latencies, after, ends = [], [], Counter()
    for sample in samples:
        end = sample["events"][-1]
        ends[f"{end['name']}({end['detail']})"] += 1
        if end["name"] == "cancelled":
            latencies.append(end["at"] - offset - (sample["closed"] or sample["left"]))
            after.append(end["tokens"] - sample["received"])
    return {
        "disconnect_ms_p50": ms(percentile(latencies, 50)),
        "disconnect_ms_max": ms(max(latencies, default=None)),
        "disconnect_tokens_after_max": max(after, default=None),
        "disconnect_ends": dict(ends),
        "hang_ups_not_seen": sum(s["closed"] is not None for s in samples),
    }


async def stall(load: LoadProcess, s: Settings, p: str, pids: list[int], debug: Any) -> tuple[dict, list]:
    made0 = await tokens_total(debug) + WARM["tokens"]  # (the connection's warm-up stream)
    await load.call(
        "stall", "stalled", protocol=p, simulate={"tokens": s.stall_tokens, "ttft_ms": 0, "itl_ms": 0}
    )
    server0, client0, start = rss(*pids), rss(load.pid), trio.current_time()
    series = []  # (seconds, server RSS growth KiB, tokens made since the stream began)
    for i in range(1, round(s.stall_seconds / EVERY) + 1):
        await trio.sleep_until(start + i * EVERY)
        series.append((round(i * EVERY, 2), rss(*pids) - server0, await tokens_total(debug) - made0))
    client = rss(load.pid) - client0
    r = await load.go()
    second_ago = next((made for t, _, made in reversed(series) if t <= series[-1][0] - 1), 0)
    later = [e for e in r["events"] if e["name"] not in ("accepted", "first_token")]
    trace = Counter(e["name"] + (f"({e['detail']})" if e["detail"] else "") for e in later)
    return {
        "stall_rss_growth_kib": max(kib for _, kib, _ in series),
        "stall_client_rss_growth_kib": client,
        "stall_received": r["received"],
        "stall_tokens_made": series[-1][2],
        "stall_tokens_last_second": series[-1][2] - second_ago,
        "stall_trace": " ".join(n if k == 1 else f"{n}×{k}" for n, k in trace.items()),
    }, series


async def measure(s: Settings) -> dict[str, Any]:
    def note(what: str) -> None:
        print(f"protocols: {what}", file=sys.stderr, flush=True)

    plan = Plan(streams=max(s.streams, s.hold_streams * len(s.protocols)), tokens=s.tokens)
    figures = {p: {"transport": PROTOCOLS[p].transport, "hang_up": PROTOCOLS[p].hang_up} for p in s.protocols}
    samples: dict[str, dict] = {}
    load_before = os.getloadavg()[0]
    async with running_server("refimpl", plan) as (proc, url), load_process(url) as load:
        pids, port = process_tree(proc.pid), int(url.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=url, trust_env=False) as debug:
            for p in s.protocols:
                await load.call("warmup", protocol=p)
            note(f"memory: {s.hold_streams} open streams per protocol")
            for p, held in (await hold(load, s, pids)).items():
                figures[p] |= held
            for p in s.protocols:
                note(f"{p}: {s.streams} streams × {s.tokens} tokens, set-up, disconnect, stalled reader")
                paced_figures, samples[p] = await paced(load, s, p, pids, port)
                figures[p] |= paced_figures | await setup(load, s, p, pids)
                samples[p] |= await load.call("disconnect", protocol=p, count=s.setup_count, simulate=LEAVE)
                stalled, samples[p]["stall"] = await stall(load, s, p, pids, debug)
                figures[p] |= stalled
    offset, uncertainty = clock_offset([x for p in s.protocols for x in samples[p]["disconnect"]])
    for p in s.protocols:
        figures[p] |= disconnects(samples[p]["disconnect"], offset)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(s),
        "config": asdict(s),
        "machine": {**environment(), "loadavg_1min": [load_before, os.getloadavg()[0]]},
        "clock_uncertainty_ms": ms(uncertainty),
        "protocols": figures,
        "samples": samples,
    }


async def run(args: argparse.Namespace) -> int:
    s = settings(args)
    if shutil.which("ss") is None:
        raise SystemExit("refimpl bench protocols reads the kernel's byte counts with ss: install iproute2")
    if args.write_lesson and s != Settings():
        raise SystemExit("--write-lesson commits the lesson's run: leave every other option at its default")
    folder = args.out or Path("bench-results") / f"protocols-{time.strftime('%Y%m%d-%H%M%S')}"
    result = await measure(s)
    folder.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(folder, result)
    table = markdown_table(result)
    (folder / "results.md").write_text(table + "\n")
    print(f"{table}\n\nresults: {write_results(folder, result)}\ntable: {folder / 'results.md'}")
    print("".join(f"plot: {folder / p}\n" for p in result["plots"]), end="")
    for f in result["protocols"].values():
        for e in f["error_messages"]:
            print(f"error: {e}", file=sys.stderr)
    if any(f["errors"] for f in result["protocols"].values()):
        return 1  # (and the lesson keeps its last good run)
    if args.write_lesson:
        print("".join(f"lesson: {path}\n" for path in write_lesson(result)), end="")
    return 0
