"""ConcurrencyWindow: Postfix's concurrency feedback and failed-cohort rule, pure."""

from __future__ import annotations

import pytest

from mqnode.delivery.feedback import FAILED_COHORT_LIMIT, ConcurrencyWindow, Contact


def test_starts_at_the_initial_concurrency_within_the_limit() -> None:
    assert ConcurrencyWindow(5, 10).sessions == 5
    assert ConcurrencyWindow(5, 2).sessions == 2
    assert ConcurrencyWindow(0, 2).sessions == 1


def test_answered_sessions_open_it_by_one_over_the_window_up_to_the_limit() -> None:
    w = ConcurrencyWindow(1, 4)
    seen = []
    for _ in range(12):
        assert not w.feedback(Contact.ANSWERED)
        seen.append(w.sessions)
    assert seen[:7] == [2, 2, 2, 3, 3, 3, 4]  # 1 -> 2 -> 2.5 -> 2.9 -> 3.24 -> ... -> 4.0
    assert max(seen) == 4 and w.window == 4.0


@pytest.mark.parametrize("contact", [Contact.LOST, Contact.UNREACHABLE])
def test_a_whole_cohort_of_failures_in_a_row_kills_the_destination(contact: Contact) -> None:
    w = ConcurrencyWindow(5, 10)
    ends = [w.feedback(contact) for _ in range(5)]
    assert ends == [False, False, False, False, True]  # 5 sessions: one cohort of 5 (to 4.1)
    assert w.sessions == 3  # 5 -> 4.8 -> 4.59 -> 4.37 -> 4.14 -> 3.9


def test_a_421_drops_the_window_to_the_sessions_the_receiver_holds_and_never_kills() -> None:
    w = ConcurrencyWindow(5, 10)
    assert not w.feedback(Contact.BUSY, others_open=2)
    assert (w.sessions, w.failing) == (2, False)
    assert not w.feedback(Contact.BUSY, others_open=3)  # never up on a refusal: 1.5
    assert w.sessions == 1
    grown = [w.feedback(Contact.ANSWERED) or w.sessions for _ in range(3)]
    assert grown == [2, 2, 3]  # 1.5 -> 2.17 -> 2.63 -> 3.01: probes again
    assert not any(w.feedback(Contact.BUSY) for _ in range(50))
    assert (w.sessions, w.failing) == (1, False)


def test_a_window_of_one_dies_with_its_one_session() -> None:
    assert ConcurrencyWindow(1, 10).feedback(Contact.UNREACHABLE)
    assert FAILED_COHORT_LIMIT == 1.0


def test_a_success_between_failures_starts_the_count_again() -> None:
    w = ConcurrencyWindow(5, 10)
    for _ in range(4):
        assert not w.feedback(Contact.UNREACHABLE)
    assert w.failing
    assert not w.feedback(Contact.ANSWERED)
    assert not w.failing
    assert not any(w.feedback(Contact.LOST) for _ in range(3))


def test_sessions_that_taught_nothing_change_nothing() -> None:
    w = ConcurrencyWindow(3, 10)
    for _ in range(10):
        assert not w.feedback(Contact.NO_FEEDBACK)
    assert (w.window, w.failing) == (3.0, False)


def test_never_below_one_session() -> None:
    w = ConcurrencyWindow(2, 2)
    w.feedback(Contact.BUSY)
    assert w.sessions == 1
    w.feedback(Contact.BUSY)
    assert w.window == 1.0


def test_learnt_once_feedback_moved_it() -> None:
    w = ConcurrencyWindow(5, 10)
    assert not w.learnt
    w.feedback(Contact.ANSWERED)
    assert w.learnt
    capped = ConcurrencyWindow(5, 5)
    capped.feedback(Contact.ANSWERED)
    assert not capped.learnt  # at its limit from the start: nothing to remember
