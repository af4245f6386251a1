"""Keep the code shown in lessons identical to the code that runs.

Strategy
--------
Lessons never paste code (STYLE §5).  The code marks a *region* with two
comment lines, and a lesson *includes* the region by name::

    # region: chunk-framer            (in refimpl/protocols/sse_chat.py)
    ...code...
    # endregion: chunk-framer

    <!-- include: refimpl/protocols/sse_chat.py#chunk-framer -->
    ```python
    ...the same code, dedented...
    ```

Marker lines are recognised by their stripped text: ``# region: NAME`` and
``# endregion: NAME``, or the same with ``//`` for JavaScript.  A region's
text is every line between its markers except marker lines (so regions may
nest), dedented, with leading and trailing blank lines dropped.

In Markdown, an include is a line that is exactly
``<!-- include: path/relative/to/repo#NAME -->``; the fenced code block on the
very next line holds the region's text.  Like cog, the tool has two modes:

``--check`` (the default)
    exit 1 and list every block that differs from its region ("stale"), every
    include that names a missing file or region, every include with no block
    after it, and every line that looks like an include but is malformed.
    ``tests/test_lessons.py`` runs this over ``lessons/*.md``.
    With no Markdown files named (the whole set of lessons), it also lists
    every region in the code that no lesson includes: a marker nobody reads
    is noise in the code, or a lesson that forgot to show it.
``--write``
    rewrite the blocks from the code (adding a block where one is missing).
    Includes that cannot be resolved are still reported, and the exit status
    is still 1, because no rewrite can fix them.

``--list FILE`` prints the regions a code file defines.  Include lines inside
another fenced block are text, not includes, so a lesson can show the syntax.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# "# region: name" / "// endregion: name" once the line is stripped.
_MARKER = re.compile(r"^(?:#|//)\s*(region|endregion):\s*(\S+)\s*$")
# The include directive, the whole line, exactly.
_INCLUDE = re.compile(r"^<!-- include: (?P<path>[^\s#]+)#(?P<name>[^\s#]+) -->$")
# Anything that was probably meant to be one (to report typos, not skip them).
_NEAR_INCLUDE = re.compile(r"^\s*<!--\s*include\b")
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_LANGUAGES = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".sh": "sh",
    ".proto": "protobuf",
    ".conf": "nginx",
}


class RegionError(Exception):
    """A code file whose region markers do not pair up."""


def find_regions(text: str) -> dict[str, str]:
    """Map each region name in a code file to its (dedented) text."""
    open_regions: dict[str, list[str]] = {}
    done: dict[str, str] = {}
    order: list[str] = []  # names in the order their regions open
    # Not str.splitlines(): that would also split at form feeds and U+2028.
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        match = _MARKER.match(line.strip())
        if match is None:
            for body in open_regions.values():
                body.append(line)
            continue
        kind, name = match.groups()
        if kind == "region":
            if name in open_regions or name in done:
                raise RegionError(f"line {number}: region {name!r} is defined twice")
            open_regions[name] = []
            order.append(name)
        else:
            if name not in open_regions:
                raise RegionError(f"line {number}: 'endregion: {name}' without 'region: {name}'")
            done[name] = _tidy(open_regions.pop(name))
    if open_regions:
        raise RegionError(f"region(s) never closed: {', '.join(sorted(open_regions))}")
    return {name: done[name] for name in order}


def _tidy(lines: list[str]) -> str:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return textwrap.dedent("\n".join(line.rstrip() for line in lines))


@dataclass
class Include:
    line: int  # 1-based line of the directive
    path: str
    name: str
    block: tuple[int, int] | None  # [start, end) lines of the code inside the fence (0-based)
    fence: str = "```"
    shown: str | None = None  # the block's current text


@dataclass
class Problem:
    doc: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.message}"


def scan_markdown(lines: list[str]) -> tuple[list[Include], list[tuple[int, str]]]:
    """Find the includes (and malformed would-be includes) in a Markdown file."""
    includes: list[Include] = []
    malformed: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:  # a fenced block that no include owns: skip it whole
            i = _fence_end(lines, i, fence["fence"]) + 1
            continue
        match = _INCLUDE.match(line.rstrip())
        if match is None:
            if _NEAR_INCLUDE.match(line):
                malformed.append((i + 1, line.strip()))
            i += 1
            continue
        inc = Include(i + 1, match["path"], match["name"], None)
        nxt = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if nxt:
            end = _fence_end(lines, i + 1, nxt["fence"])
            inc.block = (i + 2, end)
            inc.fence = nxt["fence"]
            inc.shown = "\n".join(lines[i + 2 : end])
            i = end + 1
        else:
            i += 1
        includes.append(inc)
    return includes, malformed


def _fence_end(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing the fence opened at ``start`` (or len(lines))."""
    for j in range(start + 1, len(lines)):
        stripped = lines[j].strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            return j
    return len(lines)


def _resolve(root: Path, inc: Include, cache: dict[Path, dict[str, str] | str]) -> str:
    """The region's text; raises LookupError with a message if it cannot be found."""
    path = (root / inc.path).resolve()
    if root.resolve() not in path.parents:
        raise LookupError(f"include path {inc.path!r} is outside the repository")
    if path not in cache:
        if not path.is_file():
            cache[path] = f"no such file {inc.path!r}"
        else:
            try:
                cache[path] = find_regions(path.read_text(encoding="utf-8"))
            except RegionError as err:
                cache[path] = f"{inc.path}: {err}"
    regions = cache[path]
    if isinstance(regions, str):
        raise LookupError(regions)
    if inc.name not in regions:
        known = ", ".join(sorted(regions)) or "none"
        raise LookupError(f"{inc.path} has no region {inc.name!r} (it has: {known})")
    return regions[inc.name]


def _fence_for(code: str, current: str) -> str:
    """A fence longer than any backtick run at the start of a line of ``code``."""
    fence = current if current.startswith("`") else "```"
    longest = max((len(m) for m in re.findall(r"^\s*(`{3,})", code, re.M)), default=0)
    return fence if len(fence) > longest else "`" * (longest + 1)


def process(doc: Path, root: Path = ROOT, *, write: bool = False) -> list[Problem]:
    """Check (or rewrite) one Markdown file; return what is wrong with it."""
    root, doc = root.resolve(), doc.resolve()
    text = doc.read_text(encoding="utf-8")
    lines = text.split("\n")
    includes, malformed = scan_markdown(lines)
    shown_as = doc.relative_to(root) if root in doc.parents else doc
    problems = [
        Problem(shown_as, n, f"malformed include (want exactly '<!-- include: path#name -->'): {s}")
        for n, s in malformed
    ]
    cache: dict[Path, dict[str, str] | str] = {}
    # Rewrite from the bottom up so earlier line numbers stay valid.
    for inc in reversed(includes):
        where = f"{inc.path}#{inc.name}"
        try:
            code = _resolve(root, inc, cache)
        except LookupError as err:
            problems.append(Problem(shown_as, inc.line, str(err)))
            continue
        if inc.shown == code:
            continue
        if not write:
            what = "no code block after" if inc.block is None else "stale code block for"
            hint = "(run: python tools/regions.py --write)"
            problems.append(Problem(shown_as, inc.line, f"{what} {where} {hint}"))
            continue
        language = _LANGUAGES.get(Path(inc.path).suffix, "")
        fence = _fence_for(code, inc.fence)
        if inc.block is None:
            lines[inc.line : inc.line] = [fence + language, *code.split("\n"), fence]
        else:
            start, end = inc.block
            info = _FENCE.match(lines[start - 1])["info"] or language
            lines[start - 1 : end + 1] = [fence + info, *code.split("\n"), fence]
    if write:
        new = "\n".join(lines)
        if new != text:
            doc.write_text(new, encoding="utf-8")
    problems.sort(key=lambda p: p.line)
    return problems


def lesson_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "lessons").glob("*.md"))


def code_files(root: Path = ROOT) -> list[Path]:
    """Every file that can hold regions, outside hidden and vendored folders
    and the tests (whose markers are string literals in the tool's own tests)."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix in _LANGUAGES
        and path.is_file()
        and not any(
            part.startswith(".") or part in ("node_modules", "tests") for part in path.relative_to(root).parts
        )
    )


def unused_regions(docs: list[Path], root: Path = ROOT) -> list[Problem]:
    """Regions defined in the code that none of ``docs`` includes."""
    included = set()
    for doc in docs:
        includes, _ = scan_markdown(doc.read_text(encoding="utf-8").split("\n"))
        included |= {(inc.path, inc.name) for inc in includes}
    problems = []
    for path in code_files(root):
        rel = path.relative_to(root).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            match = _MARKER.match(line.strip())
            if match and match[1] == "region" and (rel, match[2]) not in included:
                problems.append(Problem(Path(rel), number, f"region {match[2]!r} is included by no lesson"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report stale or broken includes (default)")
    mode.add_argument("--write", action="store_true", help="regenerate the included blocks")
    mode.add_argument("--list", metavar="FILE", help="list the regions defined in a code file")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    parser.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: lessons/*.md)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.list:
        for name, code in find_regions((root / args.list).read_text(encoding="utf-8")).items():
            print(f"{args.list}#{name}  ({code.count(chr(10)) + 1} lines)")
        return 0
    docs = [d.resolve() for d in args.docs] or lesson_files(root)
    problems = [p for doc in docs for p in process(doc, root, write=args.write)]
    if not args.docs:  # the whole set: every region must be shown somewhere
        problems += unused_regions(docs, root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {len(docs)} file(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
