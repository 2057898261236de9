"""Membership rules: who may change the member list, when, and which list a node starts with.

mqnode/raft/ (the pysyncobj adapter) asks `plan()` on the tick thread before it lets
pysyncobj append a membership entry, and `startup_peers()` before it builds the
pysyncobj instance. Pure: no I/O, no clock; the caller passes what the leader
sees (`LeaderView`).

Rules (single-server changes, Raft thesis section 4.1; pysyncobj applies a
membership entry when it is *appended*, not when it commits):

* only the leader changes membership, and only after its own first entry
  (the election no-op) has committed;
* one change at a time: none while a membership entry is in the log above
  the commit index (pysyncobj 0.3.17 has this check, but the index it tests is
  never set, so it lets any number through);
* add: a well-formed HOST:PORT that is not a member; remove: a member that is
  not the leader (transfer leadership first);
* the new member list must still have a majority among the nodes that
  answered the leader recently, plus the node being added if something
  accepts connections at its address (`target_up`): otherwise the cluster
  stops committing, the membership entry included, until a missing node
  shows up. (An added node that is up but far behind can still hold up
  commits while it catches up, when the cluster needs its vote: pysyncobj
  has no non-voting catch-up phase. Remove a dead member before adding.)

Member lists are sorted lists of Raft addresses (`host:port`, spelled as in
`raft_addr`) and include the node itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mqnode.config import parse_hostport
from mqnode.errors import ConfigError, MembershipError

ADD = "add"
REMOVE = "remove"
OPS = (ADD, REMOVE)

Change = tuple[str, str]  # (op, addr) of one membership entry
# changes(after, upto): the membership entries in the log in (after, upto], oldest
# first; upto None: to the end of the log.
Changes = Callable[[int, int | None], list[Change]]


def quorum(members: int) -> int:
    """Votes (and durable copies) needed among `members` nodes."""
    return members // 2 + 1


def check_addr(addr: object) -> str:
    """A Raft address as `raft_addr` spells it, or MembershipError("invalid")."""
    if not isinstance(addr, str) or not addr or any(c.isspace() or c == "," for c in addr):
        raise MembershipError("invalid", f"expected a Raft address HOST:PORT, got {addr!r}")
    try:
        parse_hostport(addr, "address")
    except ConfigError as exc:
        raise MembershipError("invalid", str(exc)) from exc
    return addr


@dataclass(frozen=True)
class LeaderView:
    """What the leader knows when a change is asked for (taken on the tick thread)."""

    self_addr: str
    members: frozenset[str]  # the latest member list in the log, the leader included
    responsive: frozenset[str]  # members that answered within leader_fallback_ms, leader included
    first_entry_committed: bool
    pending: tuple[tuple[str, str], ...]  # (op, addr) of membership entries not yet committed


def plan(op: str, addr: str, view: LeaderView, target_up: bool = False) -> list[str]:
    """The member list after `op addr`, or MembershipError("refused"/"invalid") saying why.

    `target_up`: the node being added accepts connections (checked by the caller).
    """
    if op not in OPS:
        raise MembershipError("invalid", f"unknown membership operation {op!r}")
    addr = check_addr(addr)
    if view.pending:
        what = ", ".join(f"{o} {a}" for o, a in view.pending)
        raise MembershipError(
            "refused",
            f"another membership change is pending ({what}, not committed yet); "
            "wait until it commits (mqnode cluster status) and try again",
        )
    if not view.first_entry_committed:
        raise MembershipError(
            "refused", "this leader was just elected and its first entry is not committed; retry"
        )
    if op == ADD:
        if addr in view.members:
            raise MembershipError("refused", f"{addr} is already a member")
        new = view.members | {addr}
    else:
        if addr == view.self_addr:
            raise MembershipError(
                "refused",
                f"{addr} is the leader; move leadership first "
                "(mqnode cluster transfer-leadership), then remove it through the new leader",
            )
        if addr not in view.members:
            raise MembershipError("refused", f"{addr} is not a member")
        new = view.members - {addr}
    answering = view.responsive | ({addr} if op == ADD and target_up else set())
    alive = len(answering & new)
    if alive < quorum(len(new)):
        down = sorted(new - answering)
        raise MembershipError(
            "refused",
            f"with {op} {addr} the cluster has {len(new)} members and needs {quorum(len(new))} "
            f"to commit, but only {alive} answer the leader (not answering: "
            f"{', '.join(down)}); bring them back, or remove a dead member first",
        )
    return sorted(new)


def apply_changes(members: Iterable[str], changes: Sequence[tuple[str, str]]) -> list[str]:
    """The member list after the membership entries `changes` (oldest first).

    pysyncobj's rules: adding a member or removing a non-member changes nothing.
    """
    result = set(members)
    for op, addr in changes:
        if op == ADD:
            result.add(addr)
        elif op == REMOVE:
            result.discard(addr)
    return sorted(result)


def config_before(current: Iterable[str], later: Sequence[tuple[str, str]]) -> list[str]:
    """The member list before the membership entries `later` (oldest first) were appended."""
    members = set(current)
    for op, addr in reversed(later):
        if op == ADD:
            members.discard(addr)
        elif op == REMOVE:
            members.add(addr)
    return sorted(members)


def startup_peers(
    self_addr: str, configured: Sequence[str], stored: Sequence[str] | None
) -> tuple[list[str], str | None]:
    """The peers to start with, and a warning when the stored list overrides `--peers`.

    `stored` is the member list kept in the data dir (None on a node that never
    wrote one: a fresh or joining node, or a data dir from before this was kept).
    It wins: it is the list the node's own log leads to, while `--peers` is only
    the list the cluster was first started with.
    """
    if stored is None:
        return list(configured), None
    peers = sorted(m for m in stored if m != self_addr)
    if self_addr not in stored:
        return peers, (
            f"this node ({self_addr}) is not in the member list stored in its data dir "
            f"({', '.join(sorted(stored))}): it was removed from the cluster; starting "
            "with that list anyway"
        )
    extra = sorted(set(configured) - set(peers))
    missing = sorted(set(peers) - set(configured))
    if not extra and not missing:
        return peers, None
    diff = "; ".join(
        part
        for part in (
            f"not members any more: {', '.join(extra)}" if extra else "",
            f"members --peers lacks: {', '.join(missing)}" if missing else "",
        )
        if part
    )
    return peers, (
        f"the member list stored in the data dir ({', '.join(sorted(stored))}) overrides "
        f"--peers ({diff}); update peers in this node's config"
    )


class MemberLedger:
    """The member list as the log leads to it, kept apart from pysyncobj's own list.

    Holds the list at the last applied index and reads the membership entries
    above it from the log (`changes`) when asked. pysyncobj's list can be
    briefly wrong on a follower (it undoes every membership entry past a
    truncation point, applied ones included, and redoes them as the leader
    re-sends them); this one depends only on the log's content.
    """

    def __init__(self, latest: Iterable[str], applied_index: int, changes: Changes) -> None:
        """`latest`: the list at the end of the log (stored, or --peers and self)."""
        self._changes = changes
        self.applied_to = applied_index
        self.at_applied = config_before(latest, changes(applied_index, None))
        self._end_key: tuple[object, ...] = ()
        self._end_list: list[str] = []

    def at(self, index: int) -> list[str]:
        """The list at `index` (not below the applied index)."""
        return apply_changes(self.at_applied, self._changes(self.applied_to, index))

    def at_end(self, last_index: int, last_term: int) -> list[str]:
        """The list at the end of the log, read again only when the end or the base moved.

        (index, term) of the last entry fixes every entry before it (Raft's log
        matching), so it is a safe cache key for the whole tail.
        """
        key = (last_index, last_term, self.applied_to, tuple(self.at_applied))
        if key != self._end_key:
            self._end_key, self._end_list = key, self.at(last_index)
        return self._end_list

    def advance(self, applied_index: int) -> None:
        """Entries up to `applied_index` were applied (they are still in the log)."""
        if applied_index > self.applied_to:
            self.at_applied = self.at(applied_index)
            self.applied_to = applied_index

    def reset(self, members: Iterable[str], index: int) -> None:
        """A snapshot at `index` with this list replaced the state and the log."""
        self.at_applied, self.applied_to = sorted(members), index

    def rebase(self, members: Iterable[str], index: int) -> None:
        """`members` is known to be the list right after the entry at `index`."""
        if index > self.applied_to:
            self.at_applied = config_before(members, self._changes(self.applied_to, index))
        else:
            self.at_applied = apply_changes(members, self._changes(index, self.applied_to))
