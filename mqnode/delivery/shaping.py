"""Traffic shaping at the lease holder: a site's pace, and how its replies move it.

The rules (which sites, their limits) are spool/shaping_rules.py's, applied
through the log. Rates are smooth (an interval between messages, a burst of
at most one second's worth) and live in the lease holder's memory: `SiteRate`
halves a site's rate when it answers with a throttling reply (the
rate-limited bounce category) and wins it back a twentieth at a time on
accepted mail, never above the configured rate or below a sixteenth of it;
after `SUSPEND_AFTER` throttles in a row the site is suspended for its
retry base, visibly. The limits survive a leader change (they are in the
log); this reaction state starts afresh.

`Pace` and `SiteRate` are pure and clock-free (callers pass the time);
`Shaper` is the dispatcher's use of them and of the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mqnode.clock import Clock
from mqnode.errors import ConfigError
from mqnode.spool.shaping_rules import ShapingRules, SiteConfig

log = logging.getLogger(__name__)

CLAIM_SECONDS = 2.0  # a rated site gets at most this many seconds' worth of claims
SITE_CACHE_MAX = 100_000  # destinations whose site is remembered
FLOOR_DIVISOR = 16  # a throttled site's rate goes no lower than its configured rate / this
RECOVER_STEP = 20  # an accepted message wins back 1/this of the configured rate
SUSPEND_AFTER = 5  # throttles in a row (no accepted mail between) that suspend a site


class Pace:
    """A smooth rate: `reserve(now)` says how long to wait before sending (GCRA)."""

    def __init__(self, per_s: float, burst_s: float = 1.0) -> None:
        self.per_s = per_s
        self._burst = max(1.0, per_s * burst_s)
        self._tat = 0.0  # the theoretical arrival time of the next message

    def reserve(self, now: float) -> float:
        """Take one message's place; the seconds to wait before sending it (0: now)."""
        interval = 1.0 / self.per_s
        tat = max(self._tat, now)
        wait = tat - (self._burst - 1.0) * interval - now
        self._tat = tat + interval
        return max(0.0, wait)

    def set_rate(self, per_s: float) -> None:
        self.per_s = per_s
        self._burst = max(1.0, per_s)


class SiteRate:
    """A site's current message rate, moved by its replies (module docstring)."""

    def __init__(self, configured_per_s: float) -> None:
        self.configured = configured_per_s
        self.pace = Pace(configured_per_s) if configured_per_s > 0 else None
        self.throttles = 0  # in a row, since the last accepted message
        self.suspended_until = 0.0
        self.why = ""

    @property
    def per_s(self) -> float:
        return self.pace.per_s if self.pace is not None else 0.0

    def throttled(self, now: float, reply: str, suspend_s: float) -> bool:
        """A throttling reply: halve the rate (to the floor). True when the site is now
        suspended (SUSPEND_AFTER in a row)."""
        self.throttles += 1
        if self.pace is not None:
            floor = self.configured / FLOOR_DIVISOR
            self.pace.set_rate(max(floor, self.pace.per_s / 2))
        if self.throttles >= SUSPEND_AFTER:
            self.throttles = 0
            self.suspended_until = now + suspend_s
            self.why = reply
            return True
        return False

    def accepted(self) -> None:
        self.throttles = 0
        if self.pace is not None and self.pace.per_s < self.configured:
            step = self.configured / RECOVER_STEP
            self.pace.set_rate(min(self.configured, self.pace.per_s + step))

    def suspended(self, now: float) -> bool:
        return self.suspended_until > now


@dataclass
class _SiteState:
    config: SiteConfig
    rate: SiteRate
    connections: asyncio.Semaphore | None  # max_connections
    connects: Pace | None  # connections_per_minute
    claimed: int = 0  # claimed messages waiting or sending here


class Shaper:
    """The lease holder's use of the rules: which site a destination belongs to, its pace,
    its connection budget, and its reaction to replies. The dispatcher asks it:

    * at each scan, `blocked(dest)`: leave the message unclaimed (its site is suspended,
      or has as many claimed as it may send in the next CLAIM_SECONDS, and never more
      than `max_claims`: the dispatcher's delivery slots);
    * before an attempt takes its permits, `await pace(site)` (its turn at the site's
      rate) and `connections(sites)` (a place among its max_connections);
    * after each transaction, `after(site, results, host)`.
    """

    def __init__(
        self, clock: Clock, classify: Callable[[str, str], Any], max_claims: int = 20
    ) -> None:
        self._clock = clock
        self._classify = classify
        # A rated site's claims at most: its waiting attempts count in the dispatcher's
        # claim window, and a site that filled it would hold up every other site's mail.
        self._max_claims = max(1, max_claims)
        self.rules = ShapingRules()
        self._sites: dict[str, _SiteState] = {}
        self._site_of: dict[str, str] = {}  # destination -> site name, from its MX hosts
        self._claims: dict[str, tuple[str, ...]] = {}  # queue id -> the sites it counts in
        self._applied: tuple[str, int] | None = None

    def load(self, applied: dict[str, Any]) -> None:
        """The rules as the state holds them ({"text", "at_ms"}); a change resets the sites'
        reaction state and their budgets."""
        key = (str(applied.get("text", "")), int(applied.get("at_ms", 0)))
        if key == self._applied:
            return
        self._applied = key
        try:
            self.rules = ShapingRules.parse(key[0]) if key[0] else ShapingRules()
        except ConfigError as exc:  # the state machine checked it; a newer parser may not
            log.error("traffic shaping rules not used: %s", exc)
            self.rules = ShapingRules()
        self._sites.clear()
        self._site_of.clear()
        self._claims.clear()
        if key[0]:
            names = ", ".join(s.name for s in self.rules.sites) or "none"
            log.info("traffic shaping: %d site(s) (%s) and a default", len(self.rules.sites), names)

    @property
    def active(self) -> bool:
        return bool(self._applied and self._applied[0])

    def _state(self, site: SiteConfig) -> _SiteState:
        state = self._sites.get(site.name)
        if state is None:
            state = self._sites[site.name] = _SiteState(
                site,
                SiteRate(site.rate_per_s),
                asyncio.Semaphore(site.max_connections) if site.max_connections else None,
                Pace(site.connections_per_minute / 60.0) if site.connections_per_minute else None,
            )
        return state

    def site_of(self, dest: str) -> SiteConfig:
        """The destination's site as last routed (by its domain until then)."""
        name = self._site_of.get(dest)
        return self.rules.named(name) if name is not None else self.rules.site_for(dest)

    def site_for_route(self, dest: str, mx_hosts: tuple[str, ...]) -> SiteConfig:
        site = self.rules.site_for(dest, mx_hosts)
        if len(self._site_of) >= SITE_CACHE_MAX:
            self._site_of.clear()
        self._site_of[dest] = site.name
        return site

    def blocked(self, dest: str) -> bool:
        if not self.active:
            return False
        state = self._state(self.site_of(dest))
        if state.rate.suspended(self._clock.monotonic_s()):
            return True
        per_s = state.rate.per_s
        cap = min(self._max_claims, max(2, math.ceil(per_s * CLAIM_SECONDS)))
        return per_s > 0 and state.claimed >= cap

    def claim(self, qid: str, dests: tuple[str, ...]) -> None:
        """A message claimed for `dests` counts against their sites until `release`."""
        if self.active:
            sites = tuple({self.site_of(d).name: None for d in dests})
            self._claims[qid] = sites
            for name in sites:
                self._state(self.rules.named(name)).claimed += 1

    def release(self, qid: str) -> None:
        for name in self._claims.pop(qid, ()):
            state = self._sites.get(name)
            if state is not None:
                state.claimed -= 1

    async def pace(self, site: SiteConfig) -> None:
        """Wait for this message's turn at the site's (current) rate."""
        pace = self._state(site).rate.pace
        if pace is not None:
            wait = pace.reserve(self._clock.monotonic_s())
            if wait > 0:
                await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def connections(self, sites: list[SiteConfig]) -> AsyncIterator[None]:
        """A place among each site's max_connections (in name order: no waiting in a cycle)."""
        async with contextlib.AsyncExitStack() as stack:
            for site in sorted({s.name: s for s in sites}.values(), key=lambda s: s.name):
                sem = self._state(site).connections
                if sem is not None:
                    await stack.enter_async_context(sem)
            yield

    def connect_gate(self, site: SiteConfig) -> Callable[[], Awaitable[None]] | None:
        """What the agent awaits before opening a connection (connections_per_minute)."""
        pace = self._state(site).connects
        if pace is None:
            return None

        async def gate() -> None:
            wait = pace.reserve(self._clock.monotonic_s())
            if wait > 0:
                await asyncio.sleep(wait)

        return gate

    def suspension(self, site: SiteConfig) -> str | None:
        """Why the site is suspended now, or None."""
        rate = self._state(site).rate
        return rate.why if rate.suspended(self._clock.monotonic_s()) else None

    def after(
        self, site: SiteConfig, results: list[tuple[int, str, str]], host: str, suspend_s: float
    ) -> str | None:
        """A transaction's replies into the site's rate; the reply that suspended it, if."""
        state = self._state(site)
        throttled = next(
            (
                reply
                for _, outcome, reply in results
                if outcome != "delivered" and str(self._classify(reply, host)) == "rate-limited"
            ),
            None,
        )
        if throttled is not None:
            now = self._clock.monotonic_s()
            if state.rate.throttled(now, throttled, suspend_s):
                log.warning(
                    "site %s: throttled %d times in a row; suspended for %.0f s: %s",
                    site.name,
                    SUSPEND_AFTER,
                    suspend_s,
                    throttled,
                )
                return throttled
            log.info(
                "site %s: throttled (%s); rate now %.3g/s", site.name, throttled, state.rate.per_s
            )
        elif any(outcome == "delivered" for _, outcome, _ in results):
            state.rate.accepted()
        return None

    def describe(self) -> list[dict[str, Any]]:
        """For /status and the metrics: every site met so far, its rate and suspension."""
        now = self._clock.monotonic_s()
        return [
            {
                "site": name,
                "configured_per_s": state.rate.configured,
                "per_s": round(state.rate.per_s, 4),
                "claimed": state.claimed,
                "suspended_for_s": round(max(0.0, state.rate.suspended_until - now)),
                **({"why": state.rate.why} if state.rate.suspended(now) else {}),
            }
            for name, state in sorted(self._sites.items())
        ]
