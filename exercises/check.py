"""Run an exercise's check and say, in one line, whether your change works.

    make exercise N=01               # checks exercises/01-*/exercise.py (yours)
    make exercise N=01 SOLUTION=1    # checks exercises/01-*/solution/exercise.py
    .venv/bin/python exercises/check.py 01 03 --solution   # the same, by hand
    .venv/bin/python exercises/check.py all                # every exercise

Each exercise directory holds a ``README.md`` (the task), ``exercise.py``
(the file you edit), ``check_exercise.py`` (the check: pytest, against a
real server where the lesson is about one) and ``solution/exercise.py``.
This script runs the chosen checks with pytest in this process, then prints
a verdict per exercise.  Any other option goes to pytest unchanged
(``-x``, ``-k name``, ``--junitxml=FILE``); an argument that is a
number or ``all`` names exercises.

pytest's plugins are not loaded automatically here: the repository's
development tools bring several (notebooks, Hypothesis, LangSmith) that
cost seconds of start-up and that no check uses.  The two that the checks
do use, pytest-trio and pytest-timeout, are named below.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXERCISES = sorted(p for p in HERE.iterdir() if (p / "check_exercise.py").is_file())


def usage() -> str:
    listing = "\n".join(f"  {p.name[:2]}  {p.name}" for p in EXERCISES)
    return (
        "usage: make exercise N=01 [SOLUTION=1]   (or: python exercises/check.py N [N ...]|all [--solution])\n"
        f"exercises:\n{listing}"
    )


def pick(numbers: list[str]) -> list[Path]:
    if numbers == ["all"]:
        return EXERCISES
    chosen = []
    for n in numbers:
        found = [p for p in EXERCISES if p.name.split("-")[0] == n.zfill(2)]
        if not found:
            raise SystemExit(f"no exercise {n!r}\n{usage()}")
        chosen += found
    return chosen


class Verdicts:
    """Counts each exercise's checks as they finish (a pytest plugin)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[str]] = {}

    def _count(self, nodeid: str, outcome: str) -> None:
        folder = nodeid.split("/")[0]
        self.outcomes.setdefault(folder, Counter())[outcome] += 1

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.failed:  # a failed set-up counts too
            self._count(report.nodeid, report.outcome)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._count(report.nodeid, "failed")


def main(argv: list[str]) -> int:
    numbers = [a for a in argv if a.isdigit() or a == "all"]
    options = [a for a in argv if a not in numbers]
    if not numbers:
        print(usage())
        return 0
    solution = "--solution" in options
    chosen = pick(numbers)
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    import pytest  # after the line above: pytest reads it when it starts

    verdicts = Verdicts()
    args = ["-q", "--tb=short", "-p", "trio", "-p", "pytest_timeout", "--rootdir", str(HERE)]
    args += ["-c", str(HERE / "pytest.ini"), *options, *map(str, chosen)]
    status = pytest.main(args, plugins=[verdicts])
    print()
    for folder in chosen:
        target = folder / "solution" / "exercise.py" if solution else folder / "exercise.py"
        shown = target.relative_to(HERE.parent)
        counts = verdicts.outcomes.get(folder.name, Counter())
        ran, failed = sum(counts.values()), counts["failed"]
        n = folder.name[:2]
        if ran and not failed:
            print(f"PASS  {folder.name}: all {ran} checks pass with {shown}")
        elif ran:
            again = f"make exercise N={n}" + (" SOLUTION=1" if solution else "")
            print(
                f"FAIL  {folder.name}: {failed} of {ran} checks fail with {shown} (details above); run `{again}` again after a change"
            )
        else:
            print(f"----  {folder.name}: no check ran (see pytest's message above)")
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
