"""Every shell block in the docs runs as pasted (issue 10, "Commands that paste").

A workshop teacher pastes the shell blocks of README.md and lessons/*.md into
a terminal at the repository root where only ``make run`` has happened.  This
module does the same with every one of them, against a real server, so a
command that cannot work that way fails here first.  The documents are found
by glob: a new lesson is held to the rules the moment it lands.

The convention
--------------
* A fence tagged ``sh`` (or ``bash``, ``shell``) holds commands and nothing
  else, spelled as they must be typed in that terminal: nothing from the
  virtualenv is on ``PATH`` (``.venv/bin/refimpl``, ``.venv/bin/python -m
  ...``; a block that wants ``source .venv/bin/activate`` starts with it), no
  variable is set that the block does not set itself, and every ``curl``
  carries ``--fail-with-body`` (or ``--fail``), so that an HTTP error is an
  exit status and not only a body on the screen.
* What a command prints goes in a ``text`` block.  Refused: a ``console``
  block (commands mixed with their output cannot be pasted), a ``$ `` prompt
  in a shell block, and a fence with no language at all (it could hide a
  command from this test).
* A block that does not simply exit 0 by itself says so in an HTML comment on
  the line right above its fence (above its ``<!-- include: -->`` line, for a
  region of a shell script), invisible on the rendered page:

  ``<!-- not-run: REASON -->``
      it serves until Ctrl-C on a port of its own, runs nginx, benchmarks for
      minutes, needs a browser...  Not run; ``.venv/bin/python tests/test_commands.py``
      lists every block with its reason.  Keep these few.
  ``<!-- exit: N -->``
      the text says it exits with N (curl's 18, say).
  ``<!-- ctrl-c-after: SECONDS -->``
      the text tells the reader to stop it with Ctrl-C: it gets SIGINT after
      SECONDS; it must still be running then and have printed something.
  ``<!-- xfail: REASON -->``
      it fails as written for a reason outside the docs (an included region of
      code that needs a change).  The test expects the failure and fails the
      day the block passes, so that the marker comes off.

How a block runs: alone, in a fresh ``bash -euo pipefail`` (an unset
variable, a failing command before the last line or before a pipe, all end
it with an error), cwd the repository root, ``PATH`` without the virtualenv,
stdin closed, at most 60 s, against one ``refimpl serve`` with ``make run``'s
defaults on 127.0.0.1:8000, started by this module.  If something already
listens there and it is a refimpl server (a developer's ``make run``), the
blocks run against it, as a reader's would; anything else there is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "lessons").glob("*.md"))]
SHELL_TAGS = {"sh", "bash", "shell"}
REFUSED_TAGS = {"console", "shell-session", "sh-session"}
HOST, PORT = "127.0.0.1", 8000  # where `make run` serves, and every doc says so
TIMEOUT = 60  # seconds per block

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_INCLUDE = re.compile(r"^<!-- include: \S+ -->$")
_MARKER = re.compile(r"^<!-- (?P<kind>not-run|exit|ctrl-c-after|xfail): (?P<value>\S.*?) -->$")
# Anything that was probably meant to be a marker, to report typos rather than ignore them.
_NEAR_MARKER = re.compile(r"^<!--\s*(not[-_ ]?run|exit|ctrl-c|xfail)\b", re.I)
_CURL = re.compile(r"(?:^|[\s;|&(])curl\s")
_CURL_FAILS = re.compile(r"\s(--fail(-with-body)?|-[a-zA-Z]*f[a-zA-Z]*)(?=\s|$)")


@dataclass
class Block:
    """One fenced block of a document, with the markers above it."""

    doc: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    tag: str
    text: str  # dedented by the fence's own indent (fences in list items)
    markers: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_name(self.doc)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.tag in SHELL_TAGS


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else doc.name


def scan(doc: Path) -> tuple[list[Block], list[str]]:
    """Every fenced block of ``doc``, and the problems that belong to no block
    (a marker above no shell block, a malformed marker)."""
    lines = doc.read_text().split("\n")
    blocks: list[Block] = []
    attached: set[int] = set()  # 0-based lines of markers that a block took
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[i + 1 : end]]
        tag = opening["info"].strip().split(" ")[0].lower()
        block = Block(doc, i + 1, end + 1, tag, "\n".join(body))
        above = i - 1
        if above >= 0 and _INCLUDE.match(lines[above].strip()):
            above -= 1  # markers of an included region sit above its include line
        while above >= 0 and (marker := _MARKER.match(lines[above].strip())):
            if marker["kind"] in block.markers:
                block.problems.append(f"two {marker['kind']} markers")
            block.markers[marker["kind"]] = marker["value"]
            attached.add(above)
            above -= 1
        blocks.append(block)
        i = end + 1
    loose = []
    inside = {n for b in blocks for n in range(b.line - 1, b.end)}
    for n, line in enumerate(lines):
        if n in inside or n in attached or not _NEAR_MARKER.match(line.strip()):
            continue
        if _MARKER.match(line.strip()):
            loose.append(f"{_name(doc)}:{n + 1}: marker above no block: {line.strip()}")
        else:
            loose.append(f"{_name(doc)}:{n + 1}: malformed marker: {line.strip()}")
    return blocks, loose


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def convention_problems(block: Block) -> list[str]:
    """What is wrong with a block before it runs (empty: nothing)."""
    problems = list(block.problems)
    if not block.tag:
        problems.append("a fence with no language: tag it sh (commands) or text (output)")
    if block.tag in REFUSED_TAGS:
        problems.append(f"```{block.tag} mixes commands and output: use sh for them, text for the output")
    if block.markers and not block.is_shell:
        problems.append(f"markers {sorted(block.markers)} above a ```{block.tag} block, which never runs")
    if not block.is_shell:
        return problems
    markers = block.markers
    if "not-run" in markers and len(markers) > 1:
        problems.append("a not-run block takes no other marker")
    if "exit" in markers and not markers["exit"].isdigit():
        problems.append(f"exit: {markers['exit']!r} is not a number")
    if "ctrl-c-after" in markers:
        try:
            float(markers["ctrl-c-after"])
        except ValueError:
            problems.append(f"ctrl-c-after: {markers['ctrl-c-after']!r} is not a number of seconds")
    for number, line in enumerate(block.text.split("\n"), block.line + 1):
        if line.startswith("$ "):
            problems.append(f"line {number}: a `$ ` prompt: shell blocks hold commands only")
    if "xfail" not in markers:  # an xfail block is known to be wrong already
        for command in _commands(block.text):
            if _CURL.search(command) and not _CURL_FAILS.search(command):
                problems.append(f"curl without --fail-with-body (an HTTP error exits 0): {command[:50]}...")
    return problems


def _commands(text: str) -> Iterator[str]:
    """The block's commands, a line continued with a backslash joined to the next."""
    yield from (c for c in re.sub(r"\\\n\s*", " ", text).split("\n") if c.strip())


def all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in scan(doc)[0]]


SHELL_BLOCKS = [b for b in all_blocks() if b.is_shell]
RUN = [b for b in SHELL_BLOCKS if "not-run" not in b.markers]
NOT_RUN = [b for b in SHELL_BLOCKS if "not-run" in b.markers]


# -- the convention ------------------------------------------------------------
def doc_problems(doc: Path) -> list[str]:
    blocks, problems = scan(doc)
    return problems + [f"{b.where}: {p}" for b in blocks for p in convention_problems(b)]


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_doc_follows_the_convention(doc):
    problems = doc_problems(doc)
    assert not problems, "\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("markdown", "problem"),
    [
        ("```\nmake run\n```\n", "a.md:1: a fence with no language"),
        ("```console\n$ make run\n```\n", "a.md:1: ```console mixes commands and output"),
        ("```sh\n$ make run\n```\n", "a.md:1: line 2: a `$ ` prompt"),
        ("```sh\ncurl -sN http://127.0.0.1:8000/ \\\n  -d x\n```\n", "a.md:1: curl without --fail-with-body"),
        ("<!-- not-run: starts nginx on 8080 -->\n\n```sh\nx\n```\n", "a.md:1: marker above no block"),
        ("<!-- not run: starts nginx -->\n```sh\nx\n```\n", "a.md:1: malformed marker"),
        ("<!-- exit: eighteen -->\n```sh\nx\n```\n", "a.md:2: exit: 'eighteen' is not a number"),
        ("<!-- exit: 1 -->\n```text\nx\n```\n", "a.md:2: markers ['exit'] above a ```text block"),
    ],
)
def test_the_convention_is_checked(tmp_path, markdown, problem):
    (tmp_path / "a.md").write_text(markdown)
    problems = doc_problems(tmp_path / "a.md")
    assert any(p.startswith(problem) for p in problems), problems


def test_the_same_blocks_written_by_the_convention_pass(tmp_path):
    (tmp_path / "a.md").write_text(
        "<!-- exit: 3 -->\n```sh\ncurl -sSN --fail-with-body http://x/ \\\n  -d y\n```\n"
        "```text\n$ make run\n```\n"
        "- in a list:\n  <!-- not-run: starts nginx on 8080 -->\n  ```sh\n  nginx\n  ```\n"
    )
    blocks, problems = scan(tmp_path / "a.md")
    assert problems == [] and [convention_problems(b) for b in blocks] == [[], [], []]
    assert [b.markers for b in blocks] == [{"exit": "3"}, {}, {"not-run": "starts nginx on 8080"}]
    assert blocks[2].text == "nginx"


def test_not_run_blocks_are_listed_with_a_reason():
    """Each not-run block says why in words (the list: ``.venv/bin/python tests/test_commands.py``)."""
    for block in NOT_RUN:
        assert len(block.markers["not-run"].split()) >= 3, f"{block.where}: say why it cannot run"


# -- the server `make run` would have started ------------------------------------
def _listening() -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, PORT)) == 0


def _is_refimpl() -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{PORT}/v1/models", timeout=5) as resp:
            return resp.status == 200 and any(m["id"] for m in json.load(resp)["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@pytest.fixture(scope="module")
def make_run_server(tmp_path_factory) -> Iterator[None]:
    if _listening():
        if not _is_refimpl():
            pytest.fail(f"{HOST}:{PORT} is taken by something that is not refimpl; the docs' blocks need it")
        yield  # a developer's `make run`: the blocks run against it, as a reader's would
        return
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        # What `make run` runs: `.venv/bin/refimpl serve`, every default (the port is the default too).
        server = subprocess.Popen(
            [sys.executable, "-m", "refimpl", "serve", "--port", str(PORT)],
            cwd=ROOT,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not _listening():
            assert server.poll() is None, f"refimpl serve exited {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"refimpl serve did not listen in 30 s:\n{log.read_text()}"
            time.sleep(0.05)  # polling a subprocess's port: nothing to wait on instead
        yield
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C, as in the terminal
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def shell_env() -> dict[str, str]:
    """The environment of a terminal where only `make run` ran: no virtualenv on PATH."""
    venv_bins = {(ROOT / ".venv" / "bin").resolve(), Path(sys.executable).parent.resolve()}
    path = os.environ.get("PATH", "").split(os.pathsep)
    path = [p for p in path if p and Path(p).resolve() not in venv_bins]
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join(path)
    return env


@dataclass
class Outcome:
    status: int | None  # None: still running when stopped (a timeout, or the Ctrl-C)
    stdout: str
    stderr: str

    def tail(self) -> str:
        return f"--- stdout ---\n{self.stdout[-2000:]}\n--- stderr ---\n{self.stderr[-2000:]}"


def run_block(text: str, stop_after: float = TIMEOUT) -> Outcome:
    """Run ``text`` as one pasted block.  If it is still running after
    ``stop_after`` seconds it gets SIGINT (Ctrl-C, to its whole process group)
    and ``status`` is None."""
    proc = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", text],
        cwd=ROOT,
        env=shell_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    try:
        out, err = proc.communicate(timeout=stop_after)
        return Outcome(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return Outcome(None, out, err)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what it left running in the background goes too
            os.killpg(proc.pid, signal.SIGKILL)


# -- every block, run ------------------------------------------------------------
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where)
def test_shell_block_runs_as_pasted(block, make_run_server):
    problems = convention_problems(block)  # test_doc_follows_the_convention lists them all
    assert not problems, problems
    if "ctrl-c-after" in block.markers:
        seconds = float(block.markers["ctrl-c-after"])
        outcome = run_block(block.text, stop_after=seconds)
        assert outcome.status is None, f"ended (exit {outcome.status}) before the Ctrl-C\n{outcome.tail()}"
        assert outcome.stdout.strip(), f"printed nothing in {seconds} s\n{outcome.tail()}"
        return
    outcome = run_block(block.text)
    expected = int(block.markers.get("exit", 0))
    passed = outcome.status == expected
    if "xfail" in block.markers:
        assert not passed, f"passes now: remove the xfail marker above it ({block.markers['xfail']})"
        pytest.xfail(block.markers["xfail"])
    assert outcome.status is not None, f"still running after {TIMEOUT} s\n{outcome.tail()}"
    assert passed, f"exit {outcome.status}, expected {expected}\n{outcome.tail()}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('curl -sN "$URL/v1/chat/completions"', "a variable nothing set"),
        ("refimpl serve --help", "the virtualenv is not on PATH"),
        (f"curl -sS --fail-with-body http://{HOST}:{PORT}/v1/nope", "an HTTP error"),
        (f"curl -sS --fail-with-body http://{HOST}:{PORT}/v1/nope | cat", "an HTTP error before a pipe"),
        ("false\necho the next line still ran", "a failure before the last line"),
    ],
)
def test_the_runner_does_not_let_a_failure_pass(text, why, make_run_server):
    """The silent failures a teacher met, each an error here."""
    outcome = run_block(text, stop_after=30)
    assert outcome.status not in (0, None), why


def test_ctrl_c_stops_a_running_block():
    outcome = run_block("echo started\nsleep 30", stop_after=0.5)
    assert outcome.status is None and outcome.stdout == "started\n"


if __name__ == "__main__":  # the list: every shell block, and what the test does with it
    for block in SHELL_BLOCKS:
        how = ", ".join(f"{k}: {v}" for k, v in block.markers.items()) or "run, exit 0"
        print(f"{block.where:40} {how}")
