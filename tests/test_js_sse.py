"""The browser's SSE reader (``refimpl/static/sse.js``) agrees with ours.

The Python parser's case table is the specification; every case whose
bytes are valid UTF-8 (the browser decodes with ``TextDecoder`` before the
parser sees text) runs through the JS parser in Node, whole, one code unit
at a time, and split at every point with an empty read in between, and must
give the same events and the same final last-event-id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_sse_parser import CASES

NODE = shutil.which("node")
SCRIPT = Path(__file__).parent / "js" / "sse_cases.mjs"


def _text_cases():
    for case in CASES:
        try:
            yield case, case.body.decode("utf-8")
        except UnicodeDecodeError:
            continue  # invalid UTF-8 is TextDecoder's job, not the parser's


def test_js_parser_matches_the_case_table():
    if NODE is None:
        if os.environ.get("CI"):
            pytest.fail("node is required in CI (.ci/run installs it)")
        pytest.skip("node not installed")
    cases = list(_text_cases())
    assert len(cases) > 30
    payload = json.dumps([{"name": c.name, "text": t} for c, t in cases])
    out = subprocess.run([NODE, str(SCRIPT)], input=payload, capture_output=True, text=True, check=True)
    results = json.loads(out.stdout)
    for case, _ in cases:
        expected = [[e.type, e.data, e.last_event_id] for e in case.events]
        for i, way in enumerate(results[case.name]):
            assert way["events"] == expected, f"{case.name!r}, way {i}"
            assert way["lastEventId"] == case.last_event_id, f"{case.name!r}, way {i}"
