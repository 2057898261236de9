"""Membership rules (raft/membership_rules.py) and the member list the journal stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.errors import MembershipError
from mqnode.raft import DurableJournal
from mqnode.raft.logstore import LogStore
from mqnode.raft.membership_rules import (
    ADD,
    REMOVE,
    LeaderView,
    MemberLedger,
    apply_changes,
    check_addr,
    config_before,
    plan,
    quorum,
    startup_peers,
)

A, B, C, D, E = (f"127.0.0.1:{7001 + i}" for i in range(5))


def view(
    members: set[str] | None = None,
    responsive: set[str] | None = None,
    pending: tuple[tuple[str, str], ...] = (),
    first_entry_committed: bool = True,
) -> LeaderView:
    members = {A, B, C} if members is None else members
    return LeaderView(
        self_addr=A,
        members=frozenset(members),
        responsive=frozenset(members if responsive is None else responsive),
        first_entry_committed=first_entry_committed,
        pending=pending,
    )


def refused(op: str, addr: str, v: LeaderView, target_up: bool = False) -> str:
    with pytest.raises(MembershipError) as info:
        plan(op, addr, v, target_up)
    assert info.value.kind == "refused", info.value.kind
    return str(info.value)


def test_quorum_is_a_strict_majority() -> None:
    assert [quorum(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("addr", ["10.0.0.1:7001", "[::1]:7001", "mq-1.example.org:7001"])
def test_check_addr_accepts_raft_addresses(addr: str) -> None:
    assert check_addr(addr) == addr


@pytest.mark.parametrize(
    "addr", ["", "10.0.0.1", ":7001", "10.0.0.1:0", "10.0.0.1:65536", "a b:1", "a:1,b:2", 7001]
)
def test_check_addr_refuses_malformed_addresses(addr: object) -> None:
    with pytest.raises(MembershipError) as info:
        check_addr(addr)
    assert info.value.kind == "invalid"


def test_plan_adds_and_removes_one_member() -> None:
    assert plan(ADD, D, view()) == sorted([A, B, C, D])
    assert plan(REMOVE, C, view()) == sorted([A, B])


def test_plan_refuses_a_second_change_while_one_is_pending() -> None:
    text = refused(REMOVE, C, view(members={A, B, C, D}, pending=((ADD, D),)))
    assert "pending" in text and f"add {D}" in text


def test_plan_refuses_before_the_leaders_first_entry_commits() -> None:
    assert "just elected" in refused(ADD, D, view(first_entry_committed=False))


def test_plan_refuses_members_non_members_and_the_leader() -> None:
    assert "already a member" in refused(ADD, B, view())
    assert "not a member" in refused(REMOVE, D, view())
    assert "transfer-leadership" in refused(REMOVE, A, view())


def test_plan_refuses_a_change_that_leaves_no_answering_majority() -> None:
    # C is dead: adding D needs 3 of 4, only A and B answer (D is not up).
    text = refused(ADD, D, view(responsive={A, B}))
    assert "needs 3" in text and "only 2" in text and C in text and D in text
    # ...unless D accepts connections: then A, B and D are three.
    assert plan(ADD, D, view(responsive={A, B}), target_up=True) == sorted([A, B, C, D])
    # Removing a live member with C dead leaves A and C: needs both.
    assert "needs 2" in refused(REMOVE, B, view(responsive={A, B}))
    # Removing the dead one is the way out.
    assert plan(REMOVE, C, view(responsive={A, B})) == sorted([A, B])
    # A single node can only grow with the new node up (it is half of the new pair).
    assert "needs 2" in refused(ADD, B, view(members={A}))
    assert plan(ADD, B, view(members={A}), target_up=True) == sorted([A, B])


def test_plan_refuses_unknown_ops_and_bad_addresses() -> None:
    with pytest.raises(MembershipError) as info:
        plan("move", D, view())
    assert info.value.kind == "invalid"
    with pytest.raises(MembershipError) as info:
        plan(ADD, "nope", view())
    assert info.value.kind == "invalid"


ADDRS = st.sampled_from([A, B, C, D, E])


@st.composite
def histories(draw: st.DrawFn) -> tuple[set[str], list[tuple[str, str]]]:
    """A member list and a run of valid single changes (as the leader appends them)."""
    members = set(draw(st.sets(ADDRS, min_size=1)))
    start = set(members)
    changes: list[tuple[str, str]] = []
    for addr in draw(st.lists(ADDRS, max_size=8)):
        op = REMOVE if addr in members else ADD
        if op == REMOVE and len(members) == 1:
            continue
        changes.append((op, addr))
        members = members - {addr} if op == REMOVE else members | {addr}
    return start, changes


@given(histories())
def test_config_before_undoes_apply_changes(
    history: tuple[set[str], list[tuple[str, str]]],
) -> None:
    start, changes = history
    end = apply_changes(start, changes)
    assert config_before(end, changes) == sorted(start)
    for cut in range(len(changes) + 1):  # any prefix: the list at that point in the log
        at_cut = apply_changes(start, changes[:cut])
        assert config_before(end, changes[cut:]) == at_cut


def test_startup_peers_uses_peers_until_a_list_is_stored() -> None:
    assert startup_peers(A, [B, C], None) == ([B, C], None)
    assert startup_peers(A, [C, B], [A, B, C]) == ([B, C], None)


def test_startup_peers_prefers_the_stored_list_and_names_the_difference() -> None:
    peers, warning = startup_peers(A, [B, C], [A, B, D])
    assert peers == [B, D]
    assert warning is not None
    assert f"not members any more: {C}" in warning and f"members --peers lacks: {D}" in warning


def test_startup_peers_on_a_removed_node_warns() -> None:
    peers, warning = startup_peers(D, [A, B, C], [A, B, C])
    assert peers == [A, B, C]
    assert warning is not None and "removed" in warning


def test_journal_stores_the_member_list_with_its_writes(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "raft", map_size_mb=16)
    try:
        j = DurableJournal(store)
        assert j.stored_members() is None  # nothing stored while the hook says None
        members = [A, B, C]
        j.members = lambda: list(members)
        j.flush()  # no entries pending: the list alone is reason to write
        members.append(D)
        j.add(b"\x02membership", 2, 1)  # written together with the list it leads to
        j.flush()
    finally:
        store.close()
    store = LogStore(tmp_path / "raft", map_size_mb=16)
    try:
        j = DurableJournal(store)
        assert j.stored_members() == [A, B, C, D]
        assert [e[1] for e in (j[0], j[1])] == [1, 2]
        j.set_members([C, A])
        assert DurableJournal(store).stored_members() == [A, C]
    finally:
        store.close()


class FakeLog:
    """Membership entries by index, standing in for the Raft log (other entries omitted)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[str, str]] = {}
        self.last = 1
        self.reads = 0

    def append(self, change: tuple[str, str] | None = None) -> int:
        self.last += 1
        if change is not None:
            self.entries[self.last] = change
        return self.last

    def truncate_after(self, index: int) -> None:
        self.entries = {i: c for i, c in self.entries.items() if i <= index}
        self.last = index

    def changes(self, after: int, upto: int | None) -> list[tuple[str, str]]:
        self.reads += 1
        end = self.last if upto is None else upto
        return [self.entries[i] for i in sorted(self.entries) if after < i <= end]


def test_ledger_follows_appends_applies_and_truncations() -> None:
    log = FakeLog()
    log.append()
    add_d = log.append((ADD, D))
    ledger = MemberLedger([A, B, C, D], applied_index=1, changes=log.changes)
    assert ledger.at_applied == sorted([A, B, C])  # the add is above the applied index
    assert ledger.at_end(log.last, 1) == sorted([A, B, C, D])
    ledger.advance(add_d)
    assert ledger.at_applied == sorted([A, B, C, D])
    rem_a = log.append((REMOVE, A))
    assert ledger.at_end(log.last, 1) == sorted([B, C, D])
    reads = log.reads
    assert ledger.at_end(log.last, 1) == sorted([B, C, D])
    assert log.reads == reads, "an unchanged end must not read the log again"
    log.truncate_after(rem_a - 1)  # a new leader never had the remove
    log.append()
    assert ledger.at_end(log.last, 2) == sorted([A, B, C, D])
    assert ledger.at(add_d) == sorted([A, B, C, D])


def test_ledger_reset_and_rebase() -> None:
    log = FakeLog()
    ledger = MemberLedger([A, B, C], applied_index=1, changes=log.changes)
    ledger.reset([A, B, C], 40)  # a snapshot at 40
    log.truncate_after(40)
    add_e = log.append((ADD, E))
    log.append((REMOVE, B))
    # E's own add entry says the list right after it is A, B, C, D, E: D was missing.
    ledger.rebase([A, B, C, D, E], add_e)
    assert ledger.at_applied == sorted([A, B, C, D])
    assert ledger.at_end(log.last, 3) == sorted([A, C, D, E])
    ledger.advance(log.last)
    ledger.rebase([A, B, C, D, E], add_e)  # also from below the applied index
    assert ledger.at_applied == sorted([A, C, D, E])
