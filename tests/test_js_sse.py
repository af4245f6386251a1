"""The browser's SSE reader (``refimpl/static/sse.js``) agrees with ours.

The Python parser's case table is the specification; every case whose
bytes are valid UTF-8 (the browser decodes with ``TextDecoder`` before the
parser sees text) runs through the JS parser in Node, whole, one code unit
at a time, and split at every point with an empty read in between, and must
give the same events and the same final last-event-id.

The demo page's Connect transport (``refimpl/static/transport_connect.js``)
has its own ``node --test`` file, ``tests/js/connect_envelope.test.mjs``:
its envelope decoder at every split point, and the transport through fetch
against a server that splits an envelope across network reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_sse_parser import CASES

NODE = shutil.which("node")
SCRIPT = Path(__file__).parent / "js" / "sse_cases.mjs"
CONNECT_TESTS = Path(__file__).parent / "js" / "connect_envelope.test.mjs"


def _need_node() -> str:
    if NODE is None:
        if os.environ.get("CI"):
            pytest.fail("node is required in CI (.ci/run installs it)")
        pytest.skip("node not installed")
    return NODE


def _text_cases():
    for case in CASES:
        try:
            yield case, case.body.decode("utf-8")
        except UnicodeDecodeError:
            continue  # invalid UTF-8 is TextDecoder's job, not the parser's


def test_js_parser_matches_the_case_table():
    node = _need_node()
    cases = list(_text_cases())
    assert len(cases) > 30
    payload = json.dumps([{"name": c.name, "text": t} for c, t in cases])
    out = subprocess.run([node, str(SCRIPT)], input=payload, capture_output=True, text=True, check=True)
    results = json.loads(out.stdout)
    for case, _ in cases:
        expected = [[e.type, e.data, e.last_event_id] for e in case.events]
        for i, way in enumerate(results[case.name]):
            assert way["events"] == expected, f"{case.name!r}, way {i}"
            assert way["lastEventId"] == case.last_event_id, f"{case.name!r}, way {i}"


def test_js_connect_transport():
    """Every test in the file passes, and some ran (no server needed: the
    file starts its own)."""
    cmd = [_need_node(), "--test", "--test-reporter=tap", str(CONNECT_TESTS)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, "\n" + output
    assert re.search(r"^# fail 0$", output, re.M) and re.search(r"^# pass [1-9]", output, re.M), output
