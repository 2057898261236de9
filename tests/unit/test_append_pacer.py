"""AppendPacer: at once after a quiet spell, at most once per interval while busy.

StateCommitPacer: a follower's state commits at most once per interval, at once
for a leader or a waiting caller.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqnode.raft.pacing import AppendPacer, StateCommitPacer, follower_waits


def test_a_lone_entry_goes_at_once_and_a_burst_waits_for_the_interval() -> None:
    p = AppendPacer(0.006)
    assert p.should_send(10.0, news=True)  # quiet before: no wait
    assert not p.should_send(10.001, news=True)  # 1 ms later: held back
    assert abs(p.wait_s(10.001, 0.05) - 0.005) < 1e-9  # the tick sleeps until it is due
    assert not p.should_send(10.003, news=False)  # still held, nothing new
    assert not p.should_send(10.0059, news=False)
    assert p.should_send(10.006, news=False)  # due: goes without news of its own
    assert p.wait_s(10.006, 0.05) == 0.05
    assert not p.should_send(10.007, news=False)  # nothing held, nothing new
    assert p.should_send(10.1, news=True)  # a quiet spell again: at once


def test_a_resend_never_waits_and_a_deposed_leader_holds_nothing() -> None:
    p = AppendPacer(0.006)
    assert p.should_send(1.0, news=True)
    assert p.should_send(1.001, news=False, urgent=True)
    assert not p.should_send(1.002, news=True)
    p.reset()
    assert p.wait_s(1.002, 0.05) == 0.05  # no busy loop on a follower
    assert not p.should_send(1.003, news=False)


def test_due_before_tells_the_tick_loop_to_wake_its_poll_early() -> None:
    # The poll after a tick is sized before the tick decides to hold entries back.
    p = AppendPacer(0.006)
    assert not p.due_before(99.0)  # nothing held
    assert p.should_send(5.0, news=True)
    assert not p.should_send(5.001, news=True)  # held: due at 5.006
    assert p.due_before(5.05)  # a poll sized for 50 ms must be woken
    assert not p.due_before(5.006)  # a poll sized to the due time need not


def test_zero_interval_sends_every_tick() -> None:
    p = AppendPacer(0.0)
    assert all(p.should_send(1.0 + i * 1e-6, news=True) for i in range(5))
    assert not p.should_send(2.0, news=False)


def test_a_followers_own_entry_goes_out_and_its_commit_is_told_at_once() -> None:
    # nothing from followers (0), or everything about it already sent: pacing decides
    assert not follower_waits(0, sent_upto=10, sent_commit=8, commit=9)
    assert not follower_waits(7, sent_upto=10, sent_commit=8, commit=9)
    # its entry (11) is appended but not sent yet
    assert follower_waits(11, sent_upto=10, sent_commit=8, commit=9)
    # sent, not committed yet: wait for the acks, not for a send
    assert not follower_waits(11, sent_upto=12, sent_commit=9, commit=10)
    # committed, but the followers have not been told: now
    assert follower_waits(11, sent_upto=12, sent_commit=10, commit=11)


def test_a_follower_commits_its_state_once_per_interval_unless_someone_waits() -> None:
    p = StateCommitPacer(0.025)
    assert p.should_commit(5.0, at_once=False, callers_waiting=False)  # first tick
    assert not p.should_commit(5.006, at_once=False, callers_waiting=False)
    assert not p.should_commit(5.024, at_once=False, callers_waiting=False)
    assert p.should_commit(5.025, at_once=False, callers_waiting=False)  # interval over
    assert p.should_commit(5.026, at_once=False, callers_waiting=True)  # a caller waits
    assert not p.should_commit(5.030, at_once=False, callers_waiting=False)
    assert p.should_commit(5.031, at_once=True, callers_waiting=False)  # leader, or a filling map
    assert p.should_commit(5.032, at_once=True, callers_waiting=False)


@given(st.lists(st.floats(min_value=0.0, max_value=0.05), min_size=1, max_size=200))
def test_no_applied_entry_waits_longer_than_one_interval_plus_a_tick(gaps: list[float]) -> None:
    # Ticks come at most 50 ms apart (an idle tick thread polls that long): whatever the spacing,
    # the state is never older than the interval plus one tick.
    p = StateCommitPacer(0.025)
    now, last_commit = 100.0, 100.0
    assert p.should_commit(now, at_once=False, callers_waiting=False)
    for gap in gaps:
        now += gap
        if p.should_commit(now, at_once=False, callers_waiting=False):
            last_commit = now
        assert now - last_commit < 0.025 + 0.05 + 1e-9
