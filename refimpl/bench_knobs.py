"""A measurement's knobs, declared once as a frozen dataclass.

``refimpl bench resume`` (lesson 11) and ``refimpl bench faults`` (lesson 14)
each keep their settings in a dataclass with a default per field and a line
of help per field.  From that one declaration come the command's flags, the
settings a run uses (``--quick``'s smaller base, overridden by any flag
given), and the command line a result records, so that a result can always
be run again.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from typing import Any, TypeVar

K = TypeVar("K")


def add_knobs(parser: argparse.ArgumentParser, cls: type, help: dict[str, str]) -> None:
    """A ``--flag`` per field, its default shown; absent flags stay None."""
    for f in fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), help=f"{help[f.name]} ({f.default:g})"
        )


def knobs_from(args: argparse.Namespace, quick: K) -> K:
    """The knobs of a run: ``quick`` with ``--quick``, else the defaults,
    then every flag the user gave."""
    base: dict[str, Any] = asdict(quick if args.quick else type(quick)())
    return type(quick)(**{k: d if getattr(args, k) is None else getattr(args, k) for k, d in base.items()})


def command_line(scenario: str, knobs: Any) -> str:
    """``refimpl bench SCENARIO --knob value ...``: this run, every knob spelled out."""
    spelled = (f"--{f.name.replace('_', '-')} {getattr(knobs, f.name):g}" for f in fields(knobs))
    return f"refimpl bench {scenario} " + " ".join(spelled)
