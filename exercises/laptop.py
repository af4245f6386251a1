"""Is this laptop ready for the workshop?  ``make check-laptop`` runs this.

It does, in about ten seconds, what the day will ask of the machine, and
says which part failed:

1. ``refimpl serve`` starts (the command ``make run`` runs), on a free port
   so that a ``make run`` already up is not disturbed;
2. the demo page is served, with its Send and Stop buttons;
3. a streamed answer arrives over SSE, to ``data: [DONE]``, and its trace
   says ``accepted``, ``first_token``, ``done``;
4. a WebSocket turn ends ``done``;
5. curl streams an answer too (the lessons' shell commands use it);
6. an exercise's check runs (exercise 00 against its reference solution);
7. a notebook runs in a fresh kernel (``notebooks/00-why-streaming.ipynb``;
   ``--no-notebook`` skips it);
8. port 8000, where ``make run`` serves, is free -- or already serving refimpl;
   and the two tools some lessons use beyond the exercises (nginx for lesson
   08's proxy, Node for lesson 07's JavaScript clients) are there.  Those two
   are warnings: the day works without them.

It warns first when a proxy variable (``HTTP_PROXY``...) would send the
clients' requests for 127.0.0.1 to a proxy.  Then it stops the server with Ctrl-C's signal and checks that it exits.
Nothing here needs the network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from refimpl.client import stream_chat
from refimpl.ws_client import connect

ROOT = Path(__file__).resolve().parent.parent
BODY = {
    "model": "refimpl-sim",
    "messages": [{"role": "user", "content": "Why stream tokens?"}],
    "simulate": {"ttft_ms": 100, "itl_ms": 5, "tokens": 20},
}


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def step(self, what: str, run: Callable[[], str], *, warn_only: bool = False) -> bool:
        start = time.perf_counter()
        try:
            detail, ok = run(), True
        except RuntimeError as err:  # ours: the message says it all
            detail, ok = str(err), False
        except Exception as err:  # every failure is a line of the report, not a traceback
            detail, ok = f"{type(err).__name__}: {err}", False
        mark = "ok  " if ok else ("warn" if warn_only else "FAIL")
        self.failed += not ok and not warn_only
        print(f"{mark}  {what:<44} {time.perf_counter() - start:5.1f} s  {detail}", flush=True)
        return ok


def proxy_variables() -> str:
    """httpx (so refimpl's clients, the notebooks and the checks) honours
    HTTP_PROXY and friends, for 127.0.0.1 too unless NO_PROXY lists it."""
    names = [
        k for k in os.environ if k.lower() in ("http_proxy", "https_proxy", "all_proxy") and os.environ[k]
    ]
    if not names:
        return "none set"
    bypass = {h.strip() for k in ("NO_PROXY", "no_proxy") for h in os.environ.get(k, "").split(",")}
    if "127.0.0.1" not in bypass:
        raise RuntimeError(f"{', '.join(names)} set: run `export NO_PROXY=127.0.0.1,localhost` first")
    return f"{', '.join(names)} set, and NO_PROXY lists 127.0.0.1"


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "refimpl", "serve", "--port", "0", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=30)
    found = re.search(r"streaming on (http://\S+)", first[0] if first else "")
    if not found:
        proc.kill()
        raise RuntimeError(f"no URL from refimpl serve (printed {first!r})")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, found.group(1)


def demo_page(url: str) -> str:
    page = httpx.get(url + "/", timeout=10).text
    missing = [label for label in ("Send", "Stop") if label not in page]
    if missing:
        raise RuntimeError(f"the page has no {' or '.join(missing)} button")
    return f"{url}/ has Send and Stop"


def sse_stream(url: str) -> str:
    async def main() -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            start = trio.current_time()
            events = [e async for e in stream_chat(client, url, BODY)]  # returns at [DONE], raises otherwise
            texts = [e for e in events if e.content]
            trace = (await client.get(f"{url}/v1/debug/generations/{events[0].id}")).json()
        names = [e["name"] for e in trace["events"]]
        if names != ["accepted", "first_token", "done"] or len(texts) != 20:
            raise RuntimeError(f"{len(texts)} tokens, trace {names}")
        return f"20 tokens to [DONE], TTFT {(texts[0].at - start) * 1000:.0f} ms; trace {' > '.join(names)}"

    return trio.run(main)


def websocket_turn(url: str) -> str:
    async def main() -> str:
        async with connect(url) as ws:
            events = [e async for e in ws.chat(BODY["messages"], simulate=BODY["simulate"])]
        if events[-1].type != "done":
            raise RuntimeError(f"the turn ended {events[-1].type}: {events[-1].error}")
        return f"{events[-1].usage['completion_tokens']} tokens, then done"

    return trio.run(main)


def curl_stream(url: str) -> str:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is not installed; the lessons' shell commands use it")
    headers, body = ["-H", "Content-Type: application/json"], ["-d", json.dumps({**BODY, "stream": True})]
    out = subprocess.run(
        [curl, "-sN", url + "/v1/chat/completions", *headers, *body],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    if not out.rstrip().endswith("data: [DONE]"):
        raise RuntimeError(f"curl printed {out[-200:]!r}")
    return f"{out.count('data: ')} events, the last data: [DONE]"


def exercise_check() -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "exercises" / "check.py"), "00", "--solution"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    verdict = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    if done.returncode != 0:
        raise RuntimeError(verdict)
    return "make exercise N=00 SOLUTION=1 passes"


def notebook() -> str:
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "00-why-streaming.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}
    )
    # The kernel inherits our stderr and warns there about its local TCP
    # transport; that is not news for this report.
    saved, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    try:
        client.execute()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(quiet)
    return f"{path.relative_to(ROOT)} ran in a fresh kernel"


def optional_tools() -> str:
    """Tools two lessons use beyond the exercises; missing ones are a warning."""
    from refimpl.examples.nginx_proxy import NginxNotFound, find_nginx

    missing = (
        [] if shutil.which("node") and shutil.which("npm") else ["node and npm (lesson 07's JS clients)"]
    )
    try:
        find_nginx()
    except NginxNotFound:
        missing.append("nginx (notebook 08, lesson 08's proxy)")
    if missing:
        raise RuntimeError("missing: " + "; ".join(missing))
    return "nginx, node and npm found"


def port_8000() -> str:
    try:
        models = httpx.get("http://127.0.0.1:8000/v1/models", timeout=2, trust_env=False).json()
        if models["data"][0]["id"] == "refimpl-sim":
            return "`make run` is already serving on it: open http://127.0.0.1:8000/"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        pass
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
        except OSError as err:
            raise RuntimeError(
                f"taken by another program ({err.strerror}): `make run` would fail to start"
            ) from None
    return "free for `make run`"


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("still running 15 s after Ctrl-C's signal") from None
    return f"exited with status {code} after SIGINT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that this laptop can run the refimpl workshop.")
    parser.add_argument(
        "--no-notebook", action="store_true", help="skip running a notebook (the slowest step)"
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    report = Report()
    print(f"refimpl laptop check: Python {sys.version.split()[0]} at {sys.executable}")
    report.step("proxy variables", proxy_variables, warn_only=True)
    server: list[tuple[subprocess.Popen[str], str]] = []
    if report.step("refimpl serve starts", lambda: (server.append(start_server()), server[0][1])[1]):
        proc, url = server[0]
        try:
            report.step("the demo page is served", lambda: demo_page(url))
            report.step("a streamed answer (SSE) arrives", lambda: sse_stream(url))
            report.step("a WebSocket turn ends done", lambda: websocket_turn(url))
            report.step("curl streams an answer", lambda: curl_stream(url))
        finally:
            report.step("the server stops on Ctrl-C", lambda: stop(proc))
    report.step("an exercise check runs", exercise_check)
    if not args.no_notebook:
        report.step("a notebook runs", notebook)
    report.step("optional: nginx, node", optional_tools, warn_only=True)
    report.step("port 8000 (make run)", port_8000, warn_only=True)
    seconds = time.perf_counter() - began
    if report.failed:
        print(f"NOT READY: {report.failed} step(s) failed ({seconds:.0f} s); lessons/WORKSHOP.md lists fixes")
        return 1
    print(f"READY: this laptop can run the workshop ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
