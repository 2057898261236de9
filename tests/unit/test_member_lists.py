"""Member lists that disagree with the leader's (mqnode/raft/member_lists.py) and the
Announce field that carries them."""

from __future__ import annotations

from mqnode.raft.member_lists import (
    Disagreement,
    ListWatch,
    disagreements,
    leader_not_listed,
    unlisted_peer,
)
from mqnode.spool.commands import Announce, decode_entry, encode_entry

A, B, C, TYPO = "10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001", "10.0.0.2:7010"
GOOD = [A, B, C]


def _nodes(**lists: list[str]) -> dict[str, dict[str, object]]:
    addrs = {"a": A, "b": B, "c": C}
    return {addrs[k]: {"node_id": k, "members": v} for k, v in lists.items()}


def test_a_typo_in_one_nodes_peers_is_found_and_said_plainly() -> None:
    nodes = _nodes(a=GOOD, b=GOOD, c=[A, TYPO, C])
    found = disagreements(nodes, A)
    assert [d.raft_addr for d in found] == [C]
    text = found[0].describe()
    assert f"c (10.0.0.3:7001) works with members {A}, {TYPO}, {C}" in text
    assert f"the leader a ({A}) with {A}, {B}, {C}" in text and "peers" in text


def test_the_typo_may_be_the_leaders() -> None:
    """The leader with the typo: the right lists are the ones that differ from it."""
    found = disagreements(_nodes(a=GOOD, c=[A, TYPO, C]), C)
    assert [d.raft_addr for d in found] == [A]
    assert TYPO in found[0].describe()


def test_nothing_to_compare_without_the_leaders_list() -> None:
    assert disagreements(_nodes(a=[], b=GOOD, c=[A, TYPO, C]), A) == []  # below level 3
    assert disagreements(_nodes(a=GOOD, c=[A, TYPO, C]), None) == []  # no leader known
    # a node that is not in the leader's list (removed, or not added yet) is not compared
    nodes = {**_nodes(a=GOOD, b=GOOD), "10.0.0.9:7001": {"node_id": "x", "members": [A]}}
    assert disagreements(nodes, A) == []


def test_order_does_not_matter() -> None:
    assert disagreements(_nodes(a=GOOD, b=[C, A, B], c=list(reversed(GOOD))), A) == []


def test_a_node_following_a_leader_its_list_lacks_says_so() -> None:
    text = leader_not_listed(C, (A, C, TYPO), B)
    assert text is not None and f"follows the leader {B}" in text and "peers" in text
    assert leader_not_listed(C, tuple(GOOD), B) is None
    assert leader_not_listed(C, (A, C, TYPO), None) is None
    assert leader_not_listed(C, (A, C, TYPO), C) is None


def test_the_watch_reports_only_what_lasted_the_grace_period_once() -> None:
    w = ListWatch(grace_s=10.0)
    d = Disagreement(C, "c", (A, C, TYPO), A, "a", tuple(GOOD)).describe()
    assert w.update(0.0, [d]) == ([], [])
    assert w.update(9.0, [d]) == ([], []) and w.confirmed() == []
    assert w.update(10.0, [d]) == ([d], [])
    assert w.update(12.0, [d]) == ([], []) and w.confirmed() == [d]
    assert w.update(14.0, []) == ([], [d]) and w.confirmed() == []
    # a transient one (a membership change reaching the members a moment apart) never shows
    assert w.update(20.0, [d]) == ([], []) and w.update(22.0, []) == ([], [])


def test_an_announce_without_members_encodes_as_before_and_with_them_round_trips() -> None:
    bare = Announce(A, "a", "127.0.0.1:25", "127.0.0.1:8025", 3, 2)
    assert decode_entry(encode_entry([bare])) == [bare]
    # The same bytes as a build without the field: a member below level 3 reads it.
    assert encode_entry([bare]) == encode_entry(
        [Announce(A, "a", "127.0.0.1:25", "127.0.0.1:8025", 3, 2, ())]
    )
    listed = Announce(A, "a", "127.0.0.1:25", "127.0.0.1:8025", 3, 3, tuple(GOOD))
    assert decode_entry(encode_entry([listed])) == [listed]
    assert len(encode_entry([listed])) > len(encode_entry([bare]))


def test_an_unlisted_peer_is_named_with_what_to_do() -> None:
    text = unlisted_peer(A, tuple(GOOD), TYPO)
    assert f"a node at {TYPO} has the cluster secret" in text
    assert f"mqnode cluster add-node {TYPO}" in text and "removed, stop it" in text
