"""Rate limits for the supervisor loop's periodic chores."""

from __future__ import annotations

import time


class Every:
    """``due(name, seconds)`` is True at most once per ``seconds`` per name
    (and the first time it is asked)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, name: str, seconds: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(name, -float("inf")) >= seconds:
            self._last[name] = now
            return True
        return False
