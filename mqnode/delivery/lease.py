"""LeaderLease: may this node dispatch right now, and may it re-send others' claims yet?

The leader commits a `LeaseRenew` every `lease_ms / 3`. The lease runs until
the monotonic time taken *before* submitting the last renewal that committed,
plus `lease_ms`, minus `margin_ms` (clock-rate drift between nodes). No valid
lease: no new dispatch, and a delivery in progress stops before the final "."
of DATA.

A new leader may send unclaimed mail as soon as its own lease is valid, but
re-sends a message another epoch had claimed only after waiting out the old
lease: `lease_ms + margin_ms` from the moment it became leader, on its own
monotonic clock. The old holder's lease began before its last committed
renewal, which committed before this node won its election, so by then the
old holder has stopped (it checks its lease before every final "."); this
holds as long as clocks *rates* differ by less than the margin over one lease.

Settings: `lease_ms` (default 3000), `margin_ms` (default 500).
"""

from __future__ import annotations

from mqnode.clock import Clock


class LeaderLease:
    def __init__(self, clock: Clock, lease_ms: int, margin_ms: int) -> None:
        if margin_ms * 2 >= lease_ms:
            raise ValueError("lease margin must be well below the lease duration")
        self._clock = clock
        self.lease_s = lease_ms / 1000
        self.margin_s = margin_ms / 1000
        self.epoch = 0
        self._valid_until = 0.0
        self._wait_out_until = 0.0

    @property
    def renew_interval_s(self) -> float:
        return self.lease_s / 3

    def on_leadership(self, term: int) -> None:
        """Became leader in `term`: the epoch is the term; nothing is valid yet."""
        if term != self.epoch:
            self.epoch = term
            self._valid_until = 0.0
            self._wait_out_until = self._clock.monotonic_s() + self.lease_s + self.margin_s

    def on_step_down(self) -> None:
        self.epoch = 0
        self._valid_until = 0.0

    def renew_started(self) -> float:
        """Call just before submitting a renewal; pass the result to renew_committed."""
        return self._clock.monotonic_s()

    def renew_committed(self, started_s: float, epoch: int) -> bool:
        """Extend the lease by a renewal of `epoch` that committed; False if it cannot
        (a renewal of an earlier leadership, committed late: it extends nothing)."""
        if epoch != self.epoch or epoch <= 0:
            return False
        self._valid_until = max(self._valid_until, started_s + self.lease_s - self.margin_s)
        return True

    def valid(self, epoch: int | None = None) -> bool:
        """Held now (and, if given, still in `epoch`)."""
        if self.epoch == 0 or (epoch is not None and epoch != self.epoch):
            return False
        return self._clock.monotonic_s() < self._valid_until

    def waited_out(self) -> bool:
        """Claims of earlier epochs may be taken over (the old lease has surely ended)."""
        return self.epoch > 0 and self._clock.monotonic_s() >= self._wait_out_until

    def remaining_s(self) -> float:
        return max(0.0, self._valid_until - self._clock.monotonic_s()) if self.epoch else 0.0
