"""The README's snippets, so tests run them as written (not a test module)."""
from __future__ import annotations

import re

from conftest import ROOT

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks() -> list[tuple[str, str]]:
    """Every fenced block of README.md: (language, body)."""
    return _BLOCK.findall((ROOT / "README.md").read_text())


def code_block(containing: str, language: str = "python") -> str:
    """The one fenced block of README.md in `language` that contains `containing`."""
    found = [body for lang, body in code_blocks() if lang == language and containing in body]
    assert len(found) == 1, f"README.md has {len(found)} {language} blocks containing {containing!r}"
    return found[0]
