"""Membership: a RaftNode's member list and its changes (add/remove one node at a time).

The rules (one change at a time, never remove the leader, keep a majority
of answering nodes, ...) are `mqnode.raft.membership_rules.plan`, pure and tested on
their own; this part gathers what the leader knows for them, appends the
change on the tick thread right after the checks, keeps the member list
the log leads to for the journal to store, and lets a node that started
empty adopt the list carried by the entry that added it. See
docs/design/replication.md, "Membership changes".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON
from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.node import TCPNode
from pysyncobj.pickle import loads as _pysyncobj_unpickle

from mqnode.errors import MembershipError
from mqnode.raft import membership_rules
from mqnode.raft.internals import SyncInternals
from mqnode.raft.journal import MEMBERSHIP_TYPE, DurableJournal
from mqnode.raft.settings import RaftSettings

log = logging.getLogger("mqnode.raft")

_MEMBERSHIP_OPS = {"add": membership_rules.ADD, "rem": membership_rules.REMOVE}
FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}


class Membership:
    """The member list of one RaftNode and the changes to it; runs on the tick thread,
    except `change`, which waits on the event loop for the tick thread's answer.

    `start_members` is the list this start uses (stored, else --peers, this node
    included); `joining`: this node started empty with `join` and waits for a
    leader to add it; `fresh`: its log is empty, so the entry that adds it carries
    the list it must adopt. `run_on_tick` queues a callable for the tick thread
    and wakes it.
    """

    def __init__(
        self,
        sync: Any,
        settings: RaftSettings,
        journal: DurableJournal,
        start_members: list[str],
        applied_index: int,
        joining: bool,
        fresh: bool,
        run_on_tick: Callable[[Callable[[], None]], None],
    ) -> None:
        self._sync = sync
        self._raw = SyncInternals(sync)
        self._settings = settings
        self._journal = journal
        self._run_on_tick = run_on_tick
        self.joining = joining
        self.ledger = membership_rules.MemberLedger(start_members, applied_index, self.entries)
        # A node that starts from nothing seeds its list from --peers; the entry that adds
        # it carries the cluster's list, which it adopts (see adopt_own_add).
        self.own_add_pending = fresh
        self._own_add_scanned = journal[-1][1]

    def guard(self) -> None:
        """Membership changes only through `change_membership`, and no elections while joining."""
        transport = self._raw.transport

        def refuse(_args: Any, callback: Callable[[Any, int], None]) -> None:
            callback(None, FAIL_REASON.REQUEST_DENIED)

        # pysyncobj also takes add/remove as utility messages on the Raft port (its
        # syncobj_admin tool), which would skip our one-change-at-a-time checks.
        transport.setOnUtilityMessageCallback("add", refuse)
        transport.setOnUtilityMessageCallback("remove", refuse)
        if self.joining:
            # A node nobody knows yet reaches its peers for a moment on every reconnect
            # and would start an election each time; added later, its higher term
            # would depose the leader. The first append-entries resets this deadline.
            self._raw.election_deadline = float("inf")
            log.info("raft: joining; no elections until a leader adds this node")

    # -- lifecycle -----------------------------------------------------------------

    async def change(
        self, op: str, addr: str, timeout_s: float, target_up: bool = False
    ) -> list[str]:
        """Add or remove one member (op "add"/"remove"); the new member list once committed.

        `target_up`: the caller saw the node being added accept a connection.
        Runs the checks of `membership_rules.plan` and the append on the tick thread, so
        nothing changes between them. Raises MembershipError: "not_leader" (with
        the leader's address), "invalid", "refused", "timeout" (appended but not
        committed within `timeout_s`: it may still commit) or "failed".
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[str]] = loop.create_future()

        def answer(result: list[str] | MembershipError) -> None:
            if done.done():
                return
            if isinstance(result, MembershipError):
                done.set_exception(result)
            else:
                done.set_result(result)

        def in_tick() -> None:
            try:
                new_members = membership_rules.plan(op, addr, self.leader_view(), target_up)
            except MembershipError as exc:
                loop.call_soon_threadsafe(answer, exc)
                return

            def callback(_res: Any, err: int) -> None:
                if err == FAIL_REASON.SUCCESS:
                    loop.call_soon_threadsafe(answer, new_members)
                else:
                    why = FAIL_NAMES.get(err, str(err))
                    failed = MembershipError("failed", f"{op} {addr} not committed: {why}")
                    loop.call_soon_threadsafe(answer, failed)

            if op == membership_rules.ADD:
                # pysyncobj pickles this node object into the entry: the list rides along.
                self._sync.addNodeToCluster(TCPNode(addr, mq_members=new_members), callback)
            else:
                self._sync.removeNodeFromCluster(addr, callback)
            # Append now, while this node is still the leader that ran the checks: queued,
            # it would go out after the next poll, and a follower forwards queued
            # commands to whoever leads then, past these checks.
            self._raw.check_commands_to_apply()
            log.info("raft: membership change %s %s appended", op, addr)

        self._run_on_tick(in_tick)
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            raise MembershipError(
                "timeout",
                f"{op} {addr} not committed within {timeout_s:g}s; it may still commit "
                "(or be dropped by the next leader): check mqnode cluster status",
            ) from None

    def leader_view(self) -> membership_rules.LeaderView:
        """The leader's side of `membership_rules.plan` (tick thread); MembershipError else."""
        sync = self._sync
        if not sync._isLeader():
            leader = sync._getLeader()
            addr = None if leader is None else str(leader.address)
            raise MembershipError(
                "not_leader", f"not the leader; the leader is {addr or 'unknown'}", addr
            )
        others = sync.otherNodes
        since = _pysyncobj_now() - sync.conf.leaderFallbackTimeout
        last_response = self._raw.last_response_time
        answered = {n.address for n in others if last_response.get(n, since) > since}
        noop = self._raw.noop_index
        return membership_rules.LeaderView(
            self_addr=self._settings.self_addr,
            members=frozenset(self.current()),
            responsive=frozenset({self._settings.self_addr, *answered}),
            first_entry_committed=noop is not None and sync.raftLastApplied >= noop,
            pending=tuple(self.entries(sync.raftCommitIndex, None)),
        )

    def entries(self, index: int, upto: int | None) -> list[membership_rules.Change]:
        """(op, addr) of the membership entries in the log in (index, upto], oldest first."""
        j = self._journal
        first = j[0][1]
        end = len(j) if upto is None else max(min(upto + 1 - first, len(j)), 0)
        out: list[membership_rules.Change] = []
        for pos in range(max(index + 1 - first, 0), end):
            cmd = j[pos][0]
            if cmd[0] == MEMBERSHIP_TYPE:  # an int compare: this runs over the log's tail
                request = _pysyncobj_unpickle(cmd[1:])
                out.append((_MEMBERSHIP_OPS.get(request[0], request[0]), str(request[1])))
        return out

    def current(self) -> list[str]:
        """This node's current member list (tick thread): the latest in its log."""
        others = self._sync.otherNodes
        return sorted([self._settings.self_addr, *(n.address for n in others)])

    def adopt_own_add(self) -> None:
        """On a node that started empty: take the member list from the entry that added it.

        Until then its list is --peers plus the membership entries it has received
        (or a snapshot's list). A --peers that misses a member the log never mentions
        would make this node's majorities wrong, so the list the leader put in the
        add entry wins (logged when it differs).
        """
        me, j = self._settings.self_addr, self._journal
        first, last = j[0][1], j[-1][1]
        # Entries above the commit index may be replaced: look at them again next time.
        start = min(self._own_add_scanned, self._sync.raftCommitIndex) + 1
        self._own_add_scanned = last
        for pos in range(max(start - first, 0), len(j)):
            cmd = j[pos][0]
            if cmd[0] != MEMBERSHIP_TYPE:
                continue
            request = _pysyncobj_unpickle(cmd[1:])
            listed = getattr(request[2], "mq_members", None) if len(request) > 2 else None
            if request[0] != "add" or request[1] != me or not listed:
                continue
            idx = j[pos][1]
            self.ledger.rebase(listed, idx)
            now = self.ledger.at(last)
            if now != self.current():
                log.error(
                    "raft: the member list this node started with (%s) is not the cluster's "
                    "(%s, from the entry that added it); using the cluster's",
                    ", ".join(self.current()),
                    ", ".join(now),
                )
                self._raw.update_cluster_configuration([m for m in now if m != me])
            self.own_add_pending = False
            return

    def to_store(self) -> list[str] | None:
        """What the journal stores with each write (every tick): the list at the log's end."""
        if self.joining:
            return None
        _, idx, term = self._journal[-1]
        return self.ledger.at_end(idx, term)

    def on_snapshot_installed(self, cluster: list[str], index: int) -> None:
        """A leader's snapshot replaced the state: its list, at its index, is ours now."""
        self.ledger.reset(cluster, index)
        if self._settings.self_addr in cluster:
            self.own_add_pending = False  # the leader's list names us: nothing to adopt
