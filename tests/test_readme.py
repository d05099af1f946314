"""The README documents every configuration key the code reads, so the two cannot drift apart."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.extension import DEFAULTS as JOBS_DEFAULTS
from realtime.extension import DEFAULTS as REALTIME_DEFAULTS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("key", sorted({**REALTIME_DEFAULTS, **JOBS_DEFAULTS}))
def test_every_configuration_key_is_in_the_readme(key):
    assert f"`{key}`" in README, f"README.md does not document {key}"
