"""Type aliases shared by the modules of the jobs package."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

JSON = Any  # a value json.dumps accepts: dict, list, str, int, float, bool, None
Clock = Callable[[], datetime]  # returns an aware UTC datetime; tests inject a fake one
