"""The workshop's exercises work both ways (lessons/WORKSHOP.md).

Every ``exercises/NN-*/`` holds a stub the learner edits (``exercise.py``), a
check (``check_exercise.py``) and a reference solution
(``solution/exercise.py``).  Two runs of ``exercises/check.py all`` -- the
script behind ``make exercise`` -- one against the stubs and one with
``--solution``, side by side in two processes, prove that

* every solution passes every check of its exercise;
* every stub fails, *for the reason its exercise is about*: a check that
  fails on an import error or a typo in the check would teach nothing, so
  each stub's failure must say what the lesson says (:data:`STUB_FAILS_WITH`);
* the script's verdict and exit status say so (``PASS`` / ``FAIL``, 0 / 1).

The checks are not collected by the repository's own test run (they are meant
to fail until a learner has done the work): ``testpaths`` is ``tests`` and
their file names do not match pytest's default ``test_*.py``; that is checked
here too.  So is the room check behind ``make check-laptop``, without its
notebook step (``tests/test_notebooks.py`` runs every notebook).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"
DIRS = sorted(p for p in EXERCISES.iterdir() if (p / "check_exercise.py").is_file())

#: What each stub's failure must say: the bug its lesson teaches, in the check's words.
STUB_FAILS_WITH = {
    "00-why-streaming": "the role chunk: the first byte, not the first text",
    "01-sse-wire-format": r"('message', 'a\r')",  # the CR glued to the value
    "02-openai-endpoint": 'The usage chunk has "choices": []',
    "03-websocket": "not a final message from the server",
    "04-clients": "`break` ends the loop, not the response",
    "07-midstream-errors": "instead of raising StreamFailed",
    "08-heartbeats-and-proxies": "you counted 0 pings",
    "09-cancellation": "a zombie",
    "10-backpressure": "tokens ahead of a client that takes 50 ms per write",
    "13-benchmarking": "the server sent 500",
}


def name(path: Path) -> str:
    return path.name


@pytest.fixture(scope="module")
def both(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], ET.Element]]:
    """Both runs, started together; each gives its output and its JUnit XML."""
    tmp = tmp_path_factory.mktemp("exercises")
    procs = {}
    for target, extra in (("stub", []), ("solution", ["--solution"])):
        xml = tmp / f"{target}.xml"
        command = [sys.executable, str(EXERCISES / "check.py"), "all", *extra, f"--junitxml={xml}"]
        procs[target] = (subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True), xml)
    done = {}
    for target, (proc, xml) in procs.items():
        out, _ = proc.communicate(timeout=120)
        done[target] = (subprocess.CompletedProcess(proc.args, proc.returncode, out), ET.parse(xml).getroot())
    return done


def cases(root: ET.Element, folder: Path) -> list[ET.Element]:
    """The JUnit test cases of one exercise's check."""
    found = [c for c in root.iter("testcase") if f"{folder.name}.check_exercise" in c.get("classname", "")]
    assert found, f"no check of {folder.name} ran"
    return found


def problems(case: ET.Element, kind: str) -> list[str]:
    return [(p.get("message") or "") + "\n" + (p.text or "") for p in case.findall(kind)]


def test_every_exercise_is_checked_here():
    assert [p.name for p in DIRS] == sorted(STUB_FAILS_WITH)


@pytest.mark.parametrize("folder", DIRS, ids=name)
def test_the_solution_passes(both, folder):
    for case in cases(both["solution"][1], folder):
        assert not (problems(case, "failure") + problems(case, "error") + problems(case, "skipped")), (
            case.get("name")
        )


@pytest.mark.parametrize("folder", DIRS, ids=name)
def test_the_stub_fails_for_the_right_reason(both, folder):
    found = cases(both["stub"][1], folder)
    errors = [text for case in found for text in problems(case, "error")]
    assert not errors, f"a set-up or import error is not the lesson's failure:\n{errors[0]}"
    failures = [text for case in found for text in problems(case, "failure")]
    assert failures, "the stub passes every check"
    reason = STUB_FAILS_WITH[folder.name]
    assert any(reason in text for text in failures), f"no failure says {reason!r}:\n" + "\n".join(failures)


def test_the_verdicts_and_exit_statuses(both):
    stub, solution = both["stub"][0], both["solution"][0]
    assert (stub.returncode, solution.returncode) == (1, 0), stub.stdout[-2000:] + solution.stdout[-2000:]
    for folder in DIRS:
        assert f"FAIL  {folder.name}: " in stub.stdout
        assert f"PASS  {folder.name}: " in solution.stdout


@pytest.mark.parametrize("folder", DIRS, ids=name)
def test_each_exercise_has_its_parts(folder):
    for part in ("README.md", "exercise.py", "check_exercise.py", "solution/exercise.py"):
        assert (folder / part).is_file(), part
    readme = (folder / "README.md").read_text()
    number = folder.name[:2]
    assert f"make exercise N={number}" in readme
    assert f"](../../lessons/{folder.name}.md)" in readme, "links its lesson"
    assert (ROOT / "lessons" / f"{folder.name}.md").is_file()


def test_the_checks_stay_out_of_the_repository_test_run():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    names = [p.name for p in EXERCISES.rglob("*.py")]
    assert not [n for n in names if n.startswith("test_") or n.endswith("_test.py")]


def test_the_laptop_check():
    done = subprocess.run(
        [sys.executable, str(EXERCISES / "laptop.py"), "--no-notebook"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "READY" in done.stdout
