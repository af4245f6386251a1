"""``refimpl bench`` (placeholder until the benchmark lands)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure cost per token")
    p.set_defaults(run=_run)


async def _run(args: argparse.Namespace) -> int:
    raise SystemExit("not yet")
