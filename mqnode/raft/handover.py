"""Leadership handover: ask until the target has caught up, and hold new entries meanwhile.

pysyncobj's `transferLeadership` sends TimeoutNow only if the target's match index equals
the leader's last index at that instant, and the leader keeps appending afterwards. Lease
renewals and announces append several entries a second, so a healthy target is often a
few entries behind when asked, and when it does stand, the old leader's longer log refuses
it its vote and wins the next election itself. Raft's answer (Ongaro's thesis, 3.10) is
that the leader stops taking new entries while it hands over: `AppendHold` keeps them on
our side, and gives them to pysyncobj once another node leads (which forwards them there)
or the hold times out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


async def retry_while_behind(
    ask: Callable[[], Awaitable[str]], clock: Callable[[], float], retry_s: float, pause_s: float
) -> str:
    """Call `ask` until it answers something other than "behind", or `retry_s` has passed.

    "behind" is answered as "denied" once the time is up: to the caller a target that never
    caught up and one that was refused are the same refusal.
    """
    give_up_at = clock() + retry_s
    while True:
        result = await ask()
        if result != "behind":
            return result
        if clock() + pause_s > give_up_at:
            return "denied"
        await asyncio.sleep(pause_s)


class AppendHold(Generic[T]):
    """Submissions kept back while a handover runs; thread-safe (any thread offers).

    Bounded in time, not in count: `until` always ends it, whatever pysyncobj does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0  # 0: no hold
        self._held: list[T] = []

    def hold_until(self, until: float) -> None:
        """Start the hold, or move its end (a time already past: release at the next `due`)."""
        with self._lock:
            self._until = max(until, 1e-9)

    def offer(self, item: T) -> bool:
        """Keep `item` if a hold runs (True); False: submit it now."""
        if self._until == 0.0:  # the common case: no lock
            return False
        with self._lock:
            if self._until == 0.0:
                return False
            self._held.append(item)
            return True

    def due(self, now: float, other_leads: Callable[[], bool]) -> list[T]:
        """The held items to submit now, in order; empty while the hold still runs.

        `other_leads` is asked only while a hold runs (the tick calls this every time)."""
        if self._until == 0.0:
            return []
        with self._lock:
            if not (now >= self._until or other_leads()):
                return []
            items, self._held, self._until = self._held, [], 0.0
            return items
