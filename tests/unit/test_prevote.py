"""Pre-vote rules (mqnode/raft/prevote.py): who grants, and when a round lets a node stand."""

from __future__ import annotations

import pytest

from mqnode.raft.prevote import PreVote, grants

ALIVE_S = 0.4


def _grants(
    is_leader: bool = False,
    heard_s: float | None = None,
    theirs: tuple[int, int] = (3, 120),
    ours: tuple[int, int] = (3, 120),
) -> bool:
    return grants(
        is_leader=is_leader, leader_heard_s=heard_s, alive_s=ALIVE_S, theirs=theirs, ours=ours
    )


def test_a_member_that_hears_a_leader_refuses() -> None:
    assert not _grants(heard_s=0.05)
    assert not _grants(heard_s=ALIVE_S - 0.001)
    assert _grants(heard_s=ALIVE_S)  # silent for a whole minimum election timeout
    assert _grants(heard_s=None)  # never heard one since it started


def test_the_leader_refuses_whatever_the_log() -> None:
    assert not _grants(is_leader=True, theirs=(9, 999))


@pytest.mark.parametrize(
    ("theirs", "ours", "expected"),
    [
        ((3, 120), (3, 120), True),  # equally up to date
        ((3, 121), (3, 120), True),
        ((4, 1), (3, 900), True),  # a newer last term wins over a longer log
        ((3, 119), (3, 120), False),
        ((2, 900), (3, 1), False),
    ],
)
def test_the_vote_rule_on_logs(
    theirs: tuple[int, int], ours: tuple[int, int], expected: bool
) -> None:
    assert _grants(theirs=theirs, ours=ours) is expected


def test_three_voters_need_one_grant_besides_its_own() -> None:
    pv = PreVote()
    round_id = pv.start(term=5, voters=3)
    assert not pv.may_elect(5)
    assert pv.grant(round_id, 5, "b")
    assert pv.may_elect(5)
    assert not pv.may_elect(6)  # the election raises the term: the next one asks again


def test_five_voters_need_two_distinct_grants() -> None:
    pv = PreVote()
    round_id = pv.start(term=5, voters=5)
    assert not pv.grant(round_id, 5, "b")
    assert not pv.grant(round_id, 5, "b")  # the same member twice counts once
    assert pv.grant(round_id, 5, "c")
    assert not pv.grant(round_id, 5, "d")  # passed already: reported once


def test_grants_of_an_older_round_or_term_do_not_count() -> None:
    pv = PreVote()
    old = pv.start(term=5, voters=3)
    new = pv.start(term=5, voters=3)
    assert not pv.grant(old, 5, "b")
    assert not pv.grant(new, 6, "b")  # the term moved on (another node's election)
    assert not pv.grant("junk", 5, "b")
    assert not pv.may_elect(5)
    assert pv.grant(new, 5, "b")


def test_a_single_member_passes_at_once() -> None:
    pv = PreVote()
    pv.start(term=1, voters=1)
    assert pv.may_elect(1)


def test_failed_rounds_count_in_a_row_and_reset_on_a_pass() -> None:
    pv = PreVote()
    pv.start(term=5, voters=3)
    assert pv.failed_rounds == 0
    pv.start(term=5, voters=3)
    pv.start(term=5, voters=3)
    assert pv.failed_rounds == 2
    round_id = pv.start(term=5, voters=3)
    assert pv.grant(round_id, 5, "b")
    assert pv.failed_rounds == 0
    pv.start(term=6, voters=3)  # after a passed round: nothing failed
    assert pv.failed_rounds == 0
