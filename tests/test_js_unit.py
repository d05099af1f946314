"""Runs the unit tests of static/realtime.js (tests/js/) with node's built-in test runner.

They use fakes for EventSource, fetch, timers and the document, so they need
node (18+) and nothing from npm.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT, skip_or_fail

pytestmark = pytest.mark.node


def test_realtime_js_unit_tests_pass():
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node is not installed: the unit tests of static/realtime.js need it")
    result = subprocess.run(
        [node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"node --test tests/js/ failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
