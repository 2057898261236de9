"""refused_for_log: when a node that refused a candidate stands for election at once."""

from __future__ import annotations

import pytest

from mqnode.raft.node import refused_for_log


def request(term: int, last_term: int, last_index: int) -> dict[str, object]:
    return {
        "type": "request_vote",
        "term": term,
        "last_log_term": last_term,
        "last_log_index": last_index,
    }


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ((3, 120), (3, 119), True),  # same last term, we hold more entries
        ((4, 10), (3, 500), True),  # our last entry has the newer term: index does not matter
        ((3, 120), (3, 120), False),  # equally up to date: the candidate deserved the vote
        ((3, 119), (3, 120), False),  # the candidate is ahead
        ((3, 900), (4, 1), False),  # its last term is newer
    ],
)
def test_compares_last_term_then_index(
    ours: tuple[int, int], theirs: tuple[int, int], expected: bool
) -> None:
    assert refused_for_log(request(7, *theirs), 7, ours) is expected


def test_only_requests_of_our_current_term_count() -> None:
    # An older request (we already moved on) or one we have not taken the term of.
    assert refused_for_log(request(6, 3, 1), 7, (3, 120)) is False
    assert refused_for_log(request(8, 3, 1), 7, (3, 120)) is False


def test_malformed_request_is_ignored() -> None:
    assert refused_for_log({"type": "request_vote", "term": 7}, 7, (3, 120)) is False
    bad = {**request(7, 3, 1), "last_log_index": "1"}
    assert refused_for_log(bad, 7, (3, 120)) is False
