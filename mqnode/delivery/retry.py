"""RetryPolicy: when to try a deferred message again.

Postfix-like defaults: the first retry after `retry_base_s` (300 s), doubling
per attempt up to `retry_max_s` (4000 s), with +/-10% jitter so a burst of
deferrals does not come back as a burst. The jitter is drawn by the caller
(dispatcher) before submit; the state machine only stores the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    retry_base_s: float = 300.0
    retry_max_s: float = 4000.0
    jitter_ratio: float = 0.1

    def delay_s(self, attempts: int, unit_random: Callable[[], float]) -> float:
        """Delay before attempt `attempts + 1`; `unit_random()` returns [0, 1)."""
        doublings = min(max(attempts - 1, 0), 32)  # 2**32 * base is past any sane cap
        base = min(self.retry_base_s * (2**doublings), self.retry_max_s)
        jitter = (unit_random() * 2 - 1) * self.jitter_ratio * base
        return float(max(base + jitter, 0.0))
