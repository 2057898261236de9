"""Per-client limits for the SMTP listener: token-bucket rates and a concurrency count.

`RateLimiter` answers "may this client do one more X now?" for X = connect or
start a message. Each key (a client IP) has a bucket holding up to
`per_min` tokens that refills at `per_min` tokens a minute; an action takes a
token or is refused. A fresh client may therefore burst a full minute's
worth at once, then goes at the steady rate.

`ConcurrencyLimiter` counts open connections per key and refuses the one over
`limit`; every successful `acquire` must be paired with one `release`.

Limits: at most `max_keys` clients are tracked. Past that, buckets that have
refilled completely (indistinguishable from a new client) are dropped, then
the least recently used ones until a tenth of the room is free again;
forgetting a client can only ever favour it, never refuse it wrongly. Time comes from the
injected `Clock` (monotonic), so tests drive it with `ManualClock`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from mqnode.clock import Clock

DEFAULT_MAX_KEYS = 100_000


class RateLimiter:
    """Token bucket per key; see the module docstring."""

    def __init__(self, per_min: int, clock: Clock, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if per_min <= 0 or max_keys <= 0:
            raise ValueError("per_min and max_keys must be > 0")
        self._capacity = float(per_min)
        self._per_s = per_min / 60.0
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, monotonic time of that count); oldest use first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    @property
    def per_min(self) -> int:
        return int(self._capacity)

    def allow(self, key: str, n: int = 1) -> bool:
        """Take `n` tokens for `key`; False (and nothing taken) when its bucket has fewer."""
        now = self._clock.monotonic_s()
        tokens = self._tokens(key, now)
        if tokens < n:
            self._buckets[key] = (tokens, now)
            self._buckets.move_to_end(key)
            return False
        self._buckets[key] = (tokens - n, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._prune(now)
        return True

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self._capacity
        tokens, since = entry
        # max(): a clock that never goes backwards still gets a guard
        return min(self._capacity, tokens + max(0.0, now - since) * self._per_s)

    def _prune(self, now: float) -> None:
        # Shrink to 90% so the next full scan is at least max_keys/10 new clients away.
        full = [k for k in self._buckets if self._tokens(k, now) >= self._capacity]
        for k in full:
            del self._buckets[k]
        target = self._max_keys * 9 // 10
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)


class ConcurrencyLimiter:
    """Open connections per key, at most `limit` each; see the module docstring."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("limit must be > 0")
        self._limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self._open.get(key, 0)
        if n >= self._limit:
            return False
        self._open[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._open.get(key, 0)
        assert n > 0, f"release without acquire for {key!r}"
        if n == 1:
            del self._open[key]
        else:
            self._open[key] = n - 1

    def count(self, key: str) -> int:
        return self._open.get(key, 0)

    def __len__(self) -> int:
        return len(self._open)


class ClientLimits:
    """The node's per-client connection rate, open connections and message rate, by key.

    One per node process: with SMTP worker processes the workers ask the node
    (over their link) instead of keeping counts of their own, so a client gets
    the configured limit per node, not per worker. Answers are reasons, not
    replies: "rate" (connections per minute) or "connections" (open at once).
    """

    def __init__(
        self, connection_rate_per_min: int, message_rate_per_min: int, max_open: int, clock: Clock
    ) -> None:
        self._conn_rate = RateLimiter(connection_rate_per_min, clock)
        self._msg_rate = RateLimiter(message_rate_per_min, clock)
        self._open = ConcurrencyLimiter(max_open)

    def open(self, key: str) -> str | None:
        """None: go on (pair with `close`); else why the connection is refused."""
        if not self._conn_rate.allow(key):
            return "rate"
        if not self._open.acquire(key):
            return "connections"
        return None

    def close(self, key: str) -> None:
        self._open.release(key)

    def allow_message(self, key: str) -> bool:
        return self._msg_rate.allow(key)


class ClientGate(Protocol):
    """What an SMTP listener asks about a client: ClientLimits here, or over a worker's link."""

    async def open(self, key: str) -> str | None: ...

    def close(self, key: str) -> None: ...

    async def allow_message(self, key: str) -> bool: ...


class LocalGate:
    """ClientLimits in the same process (no worker processes)."""

    def __init__(self, limits: ClientLimits) -> None:
        self._limits = limits

    async def open(self, key: str) -> str | None:
        return self._limits.open(key)

    def close(self, key: str) -> None:
        self._limits.close(key)

    async def allow_message(self, key: str) -> bool:
        return self._limits.allow_message(key)
