"""Clocks: the only place mqnode reads time.

Everything that needs time takes a `Clock`, so tests can drive it with
`ManualClock`. Wall time is for timestamps carried in commands; monotonic time
is for timeouts and leases (it never jumps).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...

    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_s(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, wall_ms: int = 1_700_000_000_000, monotonic_s: float = 1000.0) -> None:
        self._wall_ms = wall_ms
        self._mono_s = monotonic_s

    def wall_ms(self) -> int:
        return self._wall_ms

    def monotonic_s(self) -> float:
        return self._mono_s

    def advance(self, seconds: float) -> None:
        self._wall_ms += int(seconds * 1000)
        self._mono_s += seconds
