"""The checked-in gRPC code under ``refimpl/v1/`` is what ``make proto`` makes now.

Edit ``proto/refimpl/v1/chat.proto`` without running ``make proto`` and this
fails, naming the stale file.
"""

from __future__ import annotations

from refimpl import protogen


def test_generated_code_is_fresh(tmp_path):
    for fresh in protogen.generate(tmp_path):
        checked_in = protogen.ROOT / fresh.relative_to(tmp_path)
        assert checked_in.read_bytes() == fresh.read_bytes(), f"{checked_in} is stale: run `make proto`"
