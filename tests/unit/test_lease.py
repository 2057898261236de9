"""LeaderLease with a ManualClock: renewal, expiry, wait-out."""

from __future__ import annotations

import pytest

from mqnode.clock import ManualClock
from mqnode.delivery.lease import LeaderLease


def _lease() -> tuple[ManualClock, LeaderLease]:
    clock = ManualClock()
    return clock, LeaderLease(clock, lease_ms=3000, margin_ms=500)


def test_no_lease_until_a_renewal_commits() -> None:
    clock, lease = _lease()
    lease.on_leadership(term=4)
    assert not lease.valid()
    started = lease.renew_started()
    clock.advance(0.2)  # commit took 200 ms
    lease.renew_committed(started, epoch=4)
    assert lease.valid() and lease.valid(epoch=4) and not lease.valid(epoch=5)
    # runs from *before* the submit: 3.0 - 0.5 = 2.5 s after `started`
    clock.advance(2.29)
    assert lease.valid()
    clock.advance(0.02)
    assert not lease.valid()


def test_renewal_extends_and_old_epoch_renewal_is_ignored() -> None:
    clock, lease = _lease()
    lease.on_leadership(term=2)
    lease.renew_committed(lease.renew_started(), epoch=2)
    clock.advance(1.0)
    lease.renew_committed(lease.renew_started(), epoch=2)
    clock.advance(2.4)
    assert lease.valid()
    lease.on_leadership(term=3)  # re-elected in a new term: the old renewals do not count
    assert not lease.valid()
    lease.renew_committed(clock.monotonic_s(), epoch=2)
    assert not lease.valid()


def test_step_down_drops_the_lease_at_once() -> None:
    _, lease = _lease()
    lease.on_leadership(term=1)
    lease.renew_committed(lease.renew_started(), epoch=1)
    lease.on_step_down()
    assert not lease.valid() and not lease.waited_out()


def test_new_leader_waits_out_the_old_lease_before_taking_over_claims() -> None:
    clock, lease = _lease()
    lease.on_leadership(term=7)
    lease.renew_committed(lease.renew_started(), epoch=7)
    assert lease.valid() and not lease.waited_out()
    clock.advance(3.49)
    assert not lease.waited_out()
    clock.advance(0.02)
    assert lease.waited_out()


def test_margin_must_be_small() -> None:
    with pytest.raises(ValueError):
        LeaderLease(ManualClock(), lease_ms=1000, margin_ms=600)


def test_a_late_renewal_of_an_earlier_term_says_it_extended_nothing() -> None:
    _, lease = _lease()
    lease.on_leadership(term=1)
    started = lease.renew_started()
    lease.on_leadership(term=2)  # the term-1 renewal commits only now
    assert lease.renew_committed(started, epoch=1) is False
    assert not lease.valid()
    assert lease.renew_committed(lease.renew_started(), epoch=2) is True
    assert lease.valid()
