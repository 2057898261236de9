"""Do the members agree on who the members are? (a typo in one node's `peers`)

A node's member list comes from `peers` at its first start and from the
membership entries after it. A typo in one node's `peers` goes unnoticed by
Raft itself: a leader is elected, commits go on, and only that node counts
majorities over the wrong set, which matters the day it stands for election.
Each node therefore announces the list it works with (`Announce.members`,
reads level 3) and every node compares the announced lists with the
leader's: `disagreements` is the pure comparison, `ListWatch` reports one
only after it has lasted `GRACE_S`, since a membership change reaches the
members, and their announcements the state, a few seconds apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GRACE_S = 10.0


@dataclass(frozen=True)
class Disagreement:
    raft_addr: str
    node_id: str
    members: tuple[str, ...]  # the list that node announced
    leader_addr: str
    leader_id: str
    leader_members: tuple[str, ...]

    def describe(self) -> str:
        """Both lists, without guessing which is wrong: a typo'd node may be the leader."""
        return (
            f"{self.node_id} ({self.raft_addr}) works with members "
            f"{', '.join(self.members)}; the leader {self.leader_id} ({self.leader_addr}) "
            f"with {', '.join(self.leader_members)}. One of them has a wrong peers "
            "setting. peers is read at the first start only: stop that node, move its data "
            "dir away and start it with the right peers (it resyncs from the others)"
        )


def disagreements(nodes: Mapping[str, Any], leader_addr: str | None) -> list[Disagreement]:
    """The members whose announced list is not the leader's.

    `nodes` is the replicated `nodes` meta (raft address -> what that node
    announced). Nothing to compare while the leader is unknown or announced no
    list (a member below reads level 3 keeps every list out of the log).
    """
    leader = nodes.get(leader_addr or "")
    theirs = leader.get("members") if isinstance(leader, Mapping) else None
    if not theirs:
        return []
    reference = tuple(sorted(theirs))
    leader_id = str(leader.get("node_id") or leader_addr) if isinstance(leader, Mapping) else ""
    out = []
    for addr, info in sorted(nodes.items()):
        announced = info.get("members") if isinstance(info, Mapping) else None
        if not announced or addr not in reference:
            continue  # no list announced, or not a member (removed, or not added yet)
        if tuple(sorted(announced)) != reference:
            node_id = str(info.get("node_id") or addr)
            listed = tuple(sorted(announced))
            out.append(Disagreement(addr, node_id, listed, str(leader_addr), leader_id, reference))
    return out


def leader_not_listed(
    self_addr: str, members: tuple[str, ...], leader_addr: str | None
) -> str | None:
    """This node follows a leader its own member list does not name: its peers is wrong.

    Seen when the leader is a node the typo left out: this node's commands never
    reach that leader (pysyncobj forwards only to members it knows), so its
    announcement never commits and only it can tell. `leader_addr` is the leader it
    follows or, when it follows none, the one a member named in refusing its pre-vote.
    """
    if leader_addr is None or leader_addr == self_addr or leader_addr in members:
        return None
    return (
        f"this node ({self_addr}) follows the leader {leader_addr}, which its member list "
        f"({', '.join(members)}) does not name: its peers setting is wrong. peers is read at "
        "the first start only: stop this node, move its data dir away and start it with the "
        "right peers (it resyncs from the others)"
    )


def unlisted_peer(self_addr: str, members: tuple[str, ...], peer: str) -> str:
    """A node with the cluster secret introduced itself as a member we do not list."""
    return (
        f"a node at {peer} has the cluster secret and connects to this node ({self_addr}) "
        f"as a member, but this node's member list ({', '.join(members)}) does not name it: "
        f"if it is joining, add it (mqnode cluster add-node {peer}); if it was removed, stop "
        "it; otherwise one of the two has a wrong peers setting"
    )


class ListWatch:
    """Problems (as text) that lasted `grace_s`: what status shows and the log reports once."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self._grace_s = grace_s
        self._since: dict[str, float] = {}
        self._reported: set[str] = set()

    def update(self, now_s: float, seen: list[str]) -> tuple[list[str], list[str]]:
        """Record what one check saw; (newly confirmed, no longer seen among the confirmed)."""
        self._since = {d: self._since.get(d, now_s) for d in set(seen)}
        confirmed = {d for d, t in self._since.items() if now_s - t >= self._grace_s}
        new = sorted(confirmed - self._reported)
        gone = sorted(self._reported - confirmed)
        self._reported = confirmed
        return new, gone

    def confirmed(self) -> list[str]:
        return sorted(self._reported)
