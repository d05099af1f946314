"""Reading config values that may arrive as text from the environment.

`FLASK_X=...` values are parsed as JSON by Flask when they can be
(`from_prefixed_env`): `False` stays the string "False", `123` becomes an int.
"""
from __future__ import annotations

from typing import Any


def flag(value: Any) -> bool:
    """A boolean setting: "0", "false", "no", "off" and "" are false, in any case."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)
