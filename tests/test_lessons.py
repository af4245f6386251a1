"""The lessons show the code that runs (STYLE §5).

1. ``python tools/regions.py --check`` passes over every ``lessons/*.md``:
   no lesson includes a region that does not exist, and no included block is
   stale.  Lessons written by anyone use the same include syntax, so this
   covers them all.
2. The tool itself, on a scratch repository: it finds stale and missing
   blocks, missing files and regions and malformed directives, and
   ``--write`` repairs what can be repaired.
3. Each numbered lesson (every ``lessons/NN-*.md``, found by glob) shows
   its code only by include, has the parts every lesson promises (what you
   will learn, a link to its notebook when the index lists one, "Push on
   it" last), and its relative links resolve.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "regions.py"

_spec = importlib.util.spec_from_file_location("regions", TOOL)
regions = importlib.util.module_from_spec(_spec)
sys.modules["regions"] = regions  # dataclasses look their module up by name
_spec.loader.exec_module(regions)


def run_tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


# -- 1. the real lessons ---------------------------------------------------
def test_all_lessons_are_in_sync_with_the_code():
    result = run_tool("--check")
    assert result.returncode == 0, "\n" + result.stderr


#: Every numbered lesson, found by name, so a lesson is checked the moment it lands.
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]-*.md"))
INDEX = ROOT / "lessons" / "README.md"
#: Fences that show the repository's code, so must be included from a region.
#: A ```sh block may be either: a region of a shell script in the repo, or the
#: commands a reader types (``refimpl bench --repeat 3``), which are not code
#: that could drift from a file.
CODE_FENCES = {"python", "py", "javascript", "js"}


def by_name(path: Path) -> str:
    return path.name


def notebook_link(lesson: Path) -> str:
    return f"../notebooks/{lesson.stem}.ipynb"


def has_notebook(lesson: Path) -> bool:
    """Every lesson has a notebook unless its row in lessons/README.md says
    otherwise (a "—" in its notebook column; none has one today).  A lesson not in
    the index yet is held to the rule; test_index_links_every_lesson reports
    the missing row."""
    rows = [r for r in INDEX.read_text().splitlines() if r.startswith("|") and f"]({lesson.name})" in r]
    return not rows or notebook_link(lesson) in rows[0]


@pytest.mark.parametrize("lesson", LESSONS, ids=by_name)
def test_lesson_shows_code_by_include_only(lesson):
    """Code in a lesson comes from regions: no ```python (or javascript) block
    without an include line above it (a pasted snippet would drift)."""
    lines = lesson.read_text().split("\n")
    includes, _ = regions.scan_markdown(lines)
    assert includes, f"{lesson.name} includes no region"
    owned = {inc.line for inc in includes}  # 1-based line of each directive
    for number, line in enumerate(lines, 1):
        if line.startswith("```") and line.strip("`").strip() in CODE_FENCES:  # an opening code fence
            assert number - 1 in owned, f"{lesson.name}:{number}: code block not included from a region"


@pytest.mark.parametrize("lesson", LESSONS, ids=by_name)
def test_lesson_shape(lesson):
    text = lesson.read_text()
    head = text[: text.index("\n## ")] if "\n## " in text else text
    assert "you will learn" in head.lower() or "you'll learn" in head.lower()
    if has_notebook(lesson):
        assert notebook_link(lesson) in head, "links its notebook before the first section"
    else:
        assert "../notebooks/" not in head, "links a notebook the index does not list"
    assert re.search(r"^## Push on it\s*$", text, re.M), "ends with experiments"
    last = text[text.rindex("\n## ") :]
    assert last.startswith("\n## Push on it"), "Push on it comes last"


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks: code may hold ``x[...](0)``."""
    return re.sub(r"^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$", "", text, flags=re.M | re.S)


@pytest.mark.parametrize("doc", sorted((ROOT / "lessons").glob("*.md")), ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(doc.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_notebooks_and_lessons_exist_together():
    """Each notebook has its lesson, and each notebook the index lists exists."""
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (ROOT / "lessons" / f"{notebook.stem}.md").exists(), f"{notebook.name} has no lesson"
    for lesson in LESSONS:
        if has_notebook(lesson):
            assert (ROOT / "notebooks" / f"{lesson.stem}.ipynb").exists(), f"{lesson.name}: no notebook"


# -- 2. the tool on a scratch repository -----------------------------------
CODE = """\
def helper():
    return 1


class Thing:
    # region: method
    def method(self):
        # region: inner
        x = 1
        # endregion: inner
        return x
    # endregion: method
"""

JS = """\
// region: js-part
export const answer = 42;
// endregion: js-part
"""


def lesson(block: str, include: str = "pkg/mod.py#method") -> str:
    return f"# A lesson\n\nText.\n\n<!-- include: {include} -->\n{block}\nMore text.\n"


FRESH = "```python\ndef method(self):\n    x = 1\n    return x\n```"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(CODE)
    (tmp_path / "web.js").write_text(JS)
    (tmp_path / "lessons").mkdir()
    return tmp_path


def check(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The tool on the scratch lessons, named: only the includes are judged."""
    docs = [str(d) for d in sorted((repo / "lessons").glob("*.md"))]
    return run_tool("--root", str(repo), *args, *docs)


def test_regions_no_lesson_includes_are_listed(repo):
    """With no lesson named (the whole set), a region no lesson shows is a
    problem, reported at its marker; once a lesson includes it, it is not."""
    (repo / "lessons" / "a.md").write_text(lesson(FRESH))
    result = run_tool("--root", str(repo), "--check")
    assert result.returncode == 1
    assert result.stderr.splitlines()[:2] == [
        "pkg/mod.py:8: region 'inner' is included by no lesson",
        "web.js:1: region 'js-part' is included by no lesson",
    ]
    (repo / "lessons" / "b.md").write_text(lesson("", "pkg/mod.py#inner") + lesson("", "web.js#js-part"))
    assert run_tool("--root", str(repo), "--write").returncode == 0
    assert run_tool("--root", str(repo), "--check").returncode == 0


def test_region_text_is_dedented_without_markers():
    found = regions.find_regions(CODE)
    assert found["method"] == "def method(self):\n    x = 1\n    return x"
    assert found["inner"] == "x = 1"
    assert regions.find_regions(JS) == {"js-part": "export const answer = 42;"}


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("# region: a\n", "never closed"),
        ("# endregion: a\n", "without"),
        ("# region: a\n# endregion: a\n# region: a\n# endregion: a\n", "twice"),
    ],
)
def test_malformed_markers(code, message):
    with pytest.raises(regions.RegionError, match=message):
        regions.find_regions(code)


def test_fresh_block_passes(repo):
    (repo / "lessons" / "a.md").write_text(lesson(FRESH))
    assert check(repo, "--check").returncode == 0


def test_stale_block_detected_then_written(repo):
    doc = repo / "lessons" / "a.md"
    doc.write_text(lesson("```python\ndef method(self):\n    return 2\n```"))
    result = check(repo, "--check")
    assert result.returncode == 1
    assert "lessons/a.md:5: stale code block for pkg/mod.py#method" in result.stderr
    assert check(repo, "--write").returncode == 0
    assert doc.read_text() == lesson(FRESH)
    assert check(repo, "--check").returncode == 0


def test_code_change_makes_block_stale(repo):
    (repo / "lessons" / "a.md").write_text(lesson(FRESH))
    (repo / "pkg" / "mod.py").write_text(CODE.replace("x = 1", "x = 2"))
    assert "stale" in check(repo, "--check").stderr


def test_missing_block_is_added(repo):
    doc = repo / "lessons" / "a.md"
    doc.write_text(lesson("", "web.js#js-part"))
    assert "no code block after web.js#js-part" in check(repo).stderr
    assert check(repo, "--write").returncode == 0
    block = "```javascript\nexport const answer = 42;\n```\n"
    assert "<!-- include: web.js#js-part -->\n" + block in doc.read_text()


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ("pkg/mod.py#nope", "pkg/mod.py has no region 'nope' (it has: inner, method)"),
        ("pkg/gone.py#method", "no such file 'pkg/gone.py'"),
        ("../outside.py#x", "outside the repository"),
    ],
)
def test_missing_region_or_file(repo, include, message):
    doc = repo / "lessons" / "a.md"
    doc.write_text(lesson(FRESH, include))
    for mode in ("--check", "--write"):  # --write cannot fix these: still an error
        result = check(repo, mode)
        assert result.returncode == 1
        assert message in result.stderr
    assert doc.read_text() == lesson(FRESH, include)


def test_every_problem_is_listed(repo):
    (repo / "lessons" / "a.md").write_text(lesson("```python\nold\n```") + lesson(FRESH, "pkg/mod.py#nope"))
    (repo / "lessons" / "b.md").write_text("<!--include: pkg/mod.py#method-->\n")
    result = check(repo)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == "3 problem(s) in 2 file(s)"
    assert "malformed include" in result.stderr


def test_include_inside_a_fence_is_just_text(repo):
    doc = repo / "lessons" / "a.md"
    doc.write_text("````markdown\n<!-- include: pkg/mod.py#nope -->\n```python\n```\n````\n")
    assert check(repo).returncode == 0


def test_write_uses_a_longer_fence_when_code_has_one(repo):
    (repo / "pkg" / "doc.py").write_text('# region: r\ns = """\n```\n"""\n# endregion: r\n')
    doc = repo / "lessons" / "a.md"
    doc.write_text("<!-- include: pkg/doc.py#r -->\n")
    assert check(repo, "--write").returncode == 0
    assert doc.read_text() == '<!-- include: pkg/doc.py#r -->\n````python\ns = """\n```\n"""\n````\n'
    assert check(repo).returncode == 0


def test_list_regions(repo):
    result = check(repo, "--list", "pkg/mod.py")
    assert result.stdout.splitlines() == ["pkg/mod.py#method  (3 lines)", "pkg/mod.py#inner  (1 lines)"]


# -- 3b. the index ---------------------------------------------------------
def test_index_links_every_lesson():
    index = (ROOT / "lessons" / "README.md").read_text()
    for doc in sorted((ROOT / "lessons").glob("[0-9][0-9]-*.md")):
        assert f"]({doc.name})" in index, f"lessons/README.md does not link {doc.name}"


def test_index_marks_only_existing_lessons_done():
    for row in (ROOT / "lessons" / "README.md").read_text().splitlines():
        if row.startswith("|") and "✅" in row:
            for target in re.findall(r"\]\(([^)]+)\)", row):
                assert (ROOT / "lessons" / target).resolve().exists(), f"✅ but missing: {target}"
