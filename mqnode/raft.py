"""RaftNode: the only module that imports pysyncobj (pinned to 0.3.17).

What it promises
* `submit_entry(entry, done)` appends one entry; `done(results, None)` runs on
  the asyncio loop only after the entry is committed by a majority, applied to
  LMDB *and that LMDB transaction is committed*; otherwise `done(None, reason)`.
  It may also never be called (leader lost, partition): callers time out.
* An entry counts toward commit on a follower only after it is fsynced there:
  acknowledgements (`next_node_idx`) are held back until the tick's journal
  flush. Term and vote are written synchronously before any vote is sent.
* One fsync per tick for the journal and one for the state, however many
  entries the tick carried (group commit).

What it assumes about pysyncobj (each item is a workaround, see
docs/design/replication.md):
* We run its tick loop ourselves (`autoTick=False`) so that we can flush and
  release acks between ticks.
* Its journal is replaced by `DurableJournal` right after construction; its
  own FileJournal does not fsync and its dump-file loader drops entries.
* Its startup dump-file load is disabled; the LMDB state (with its applied
  index) is the snapshot, and the journal holds everything after it.
* Snapshots go through its serializer/deserializer hooks as `snapshot.py`
  files; installing one replaces the LMDB state.
* Membership changes (`change_membership`) are its dynamic membership: an
  entry takes effect when appended. The member list it leads to is stored in
  the journal's metadata with every journal write, and wins over `--peers` at
  the next start (applied entries are never replayed here, so pysyncobj's own
  restore-by-replay does not happen).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.journal import Journal
from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.node import TCPNode
from pysyncobj.pickle import loads as _pysyncobj_unpickle
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.transport import TCPTransport

from . import membership, snapshot
from .errors import CorruptDataError, MembershipError, StoreFullError
from .statemachine import QueueStateMachine, Result
from .store import LogStore, QueueStore

log = logging.getLogger(__name__)

NO_OP = b"\x01"  # pysyncobj's _COMMAND_TYPE.NO_OP marker
MEMBERSHIP = b"\x02"  # _COMMAND_TYPE.MEMBERSHIP: pickled [op, node id, node], op "add"/"rem"
_MEMBERSHIP_TYPE = MEMBERSHIP[0]
_MEMBERSHIP_OPS = {"add": membership.ADD, "rem": membership.REMOVE}
_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}

Done = Callable[[list[Result] | None, str | None], None]
Entry = tuple[bytes, int, int]


class DurableJournal(Journal):  # type: ignore[misc]
    """pysyncobj's journal interface over `LogStore`: in memory for reads, durable per batch."""

    def __init__(self, store: LogStore) -> None:
        self._store = store
        self._entries: list[Entry] = store.load()
        self._meta: dict[str, Any] = store.get_meta()
        self._ops: list[tuple[str, int, int, bytes]] = []
        self._meta_dirty = False
        self.applied_index: Callable[[], int] = lambda: 0  # set by RaftNode once it exists
        # The member list the in-memory log leads to (None: do not store one yet). Read at
        # every write, so the stored list always matches the entries written with it.
        self.members: Callable[[], list[str] | None] = lambda: None
        if not self._entries:
            self.add(NO_OP, 1, int(self._meta.get("term", 0)))
            self.flush()

    # -- the interface pysyncobj calls ---------------------------------------
    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._entries and idx <= self._entries[-1][1]:
            # A re-sent entry we kept (see deleteEntriesFrom): must be the same entry.
            first = self._entries[0][1]
            if idx < first or self._entries[idx - first][2] == term:
                return
            raise CorruptDataError(
                f"leader sent index {idx} term {term}, but the applied entry there has term "
                f"{self._entries[idx - first][2]}"
            )
        if self._entries and idx != self._entries[-1][1] + 1:
            raise CorruptDataError(f"journal add out of order: {idx} after {self._entries[-1][1]}")
        self._entries.append((command, idx, term))
        self._ops.append(("add", idx, term, command))

    def clear(self) -> None:
        self._entries = []
        self._ops.append(("clear", 0, 0, b""))

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        idx = self._entries[entryFrom][1]
        floor = self.applied_index() + 1
        if idx < floor:
            # pysyncobj truncates from a re-sent batch's start even below what was applied,
            # then re-appends only that batch; a crash in between left the log shorter than
            # the state. Applied entries are committed, so identical everywhere: keep them.
            entryFrom += floor - idx
            if entryFrom >= len(self._entries):
                return
            idx = floor
        del self._entries[entryFrom:]
        self._ops.append(("del_from", idx, 0, b""))

    def deleteEntriesTo(self, entryTo: int) -> None:
        # Never compact away the last two entries: pysyncobj can ask to delete past the
        # end of the log, after which every tick raises IndexError.
        entryTo = min(entryTo, len(self._entries) - 2)
        if entryTo <= 0:
            return
        idx = self._entries[entryTo][1]
        self._entries = self._entries[entryTo:]
        self._ops.append(("del_to", idx, 0, b""))

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        pass

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._meta.get("commit") != raftCommitIndex:
            self._meta["commit"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("commit", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        self._meta["term"] = term
        self._meta["vote"] = votedForNodeId
        self.flush(force_meta=True)  # durable before any vote message leaves

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> str | None:
        vote = self._meta.get("vote")
        return None if vote is None else str(vote)

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty and not self._ops:
            self.flush(force_meta=True)

    # -- ours ------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self._ops)

    def stored_members(self) -> list[str] | None:
        members = self._meta.get("members")
        return None if members is None else [str(m) for m in members]

    def set_members(self, members: list[str]) -> None:
        self._meta["members"] = sorted(members)
        self.flush(force_meta=True)

    def flush(self, force_meta: bool = False) -> int:
        """Write pending ops (and metadata) in one synced transaction; returns entries added."""
        members = self.members()
        if members is not None and members != self._meta.get("members"):
            self._meta["members"] = members
            force_meta = True
        if not self._ops and not force_meta:
            return 0
        ops = self._ops
        self._store.write(ops, dict(self._meta))  # on failure ops stay pending, acks stay held
        self._ops = []
        self._meta_dirty = False
        return sum(1 for op in ops if op[0] == "add")

    def reset(self, entries: list[Entry]) -> None:
        self.clear()
        for e in entries:
            self.add(*e)
        self.flush()


class _Transport(TCPTransport):  # type: ignore[misc]
    """Holds back follower acknowledgements until the journal is fsynced.

    Also the fault-injection drop hook: messages to and from peers in
    `mq_blocked` are dropped (a network partition as pysyncobj sees it; a TCP
    proxy cannot do this because peers are identified by announced address).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._mq_deferred: list[tuple[Any, Any]] = []
        self.mq_blocked: frozenset[str] = frozenset()
        self.mq_resend = False
        super().__init__(syncObj, selfNode, otherNodes)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self.mq_blocked and getattr(node, "address", None) in self.mq_blocked:
            return
        next_index = self._syncObj._SyncObj__raftNextIndex
        sent_up_to = next_index.get(node)
        super()._onMessageReceived(node, message)
        if message.get("type") == "next_node_idx" and message.get("reset"):
            self.mq_resend = True  # retry at once, not at the next heartbeat
        # pysyncobj sets nextIndex to the acked position on every success, rewinding past
        # batches already in flight, which it then re-sends and the follower truncates and
        # re-appends. A success only confirms a prefix: keep what was already sent.
        if (
            message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
            and sent_up_to is not None
            and next_index.get(node, 0) < sent_up_to
        ):
            next_index[node] = sent_up_to

    def send(self, node: Any, message: Any) -> bool:
        if self.mq_blocked and getattr(node, "address", None) in self.mq_blocked:
            return False
        if message.get("type") == "next_node_idx" and message.get("reset"):
            message = self._skip_conflicting_term(message)
        if message.get("type") == "next_node_idx" and self._syncObj._mq_journal.dirty:
            self._mq_deferred.append((node, message))
            return True
        return bool(super().send(node, message))

    def _skip_conflicting_term(self, message: dict[str, Any]) -> dict[str, Any]:
        """Follower side: answer a log mismatch with the first index of the conflicting term.

        pysyncobj backs off one index per round trip (and the leader waits for its next
        heartbeat to retry), so a returning ex-leader with hundreds of uncommitted
        entries took tens of seconds to rejoin. Raft's usual optimisation (thesis
        5.3): skip the whole conflicting term at once.
        """
        journal = self._syncObj._mq_journal
        idx = message.get("next_node_idx")
        if not isinstance(idx, int) or len(journal) < 2:
            return message
        first, last = journal[0][1], journal[-1][1]
        if not first < idx <= last:
            return message
        term = journal[idx - first][2]
        pos = idx - first
        while pos > 1 and journal[pos - 1][2] == term:
            pos -= 1
        return {**message, "next_node_idx": journal[pos][1]}

    def release_deferred(self) -> None:
        deferred, self._mq_deferred = self._mq_deferred, []
        for node, message in deferred:
            super().send(node, message)


class _SyncObj(SyncObj):  # type: ignore[misc]
    def __init__(
        self, owner: RaftNode, self_addr: str, peers: list[str], conf: Any, journal: DurableJournal
    ) -> None:
        self._mq_owner = owner
        self._mq_journal = journal
        super().__init__(self_addr, peers, conf, transportClass=_Transport)
        self._mq_notifier = PipeNotifier(self._poller)

    @replicated  # type: ignore[untyped-decorator]
    def mq_apply(self, entry: bytes) -> list[Result] | None:
        return self._mq_owner._apply(entry)


@dataclass(frozen=True)
class RaftSettings:
    self_addr: str
    peers: list[str]
    secret: str
    data_dir: Path
    election_timeout_min_ms: int
    election_timeout_max_ms: int
    heartbeat_ms: int
    leader_fallback_ms: int
    log_compaction_min_entries: int
    log_compaction_min_time_s: int
    raft_map_size_mb: int
    # A new node joining a running cluster: no elections until a leader contacts it
    # (after `mqnode cluster add-node`), so its rising term cannot depose that leader.
    join: bool = False


@dataclass(frozen=True)
class RaftStatus:
    role: str
    leader_addr: str | None
    term: int
    commit_index: int
    last_applied: int
    has_quorum: bool
    log_len: int
    match_index: dict[str, int] = field(default_factory=dict)  # leader only: per peer
    members: tuple[str, ...] = ()  # the latest member list in this node's log, itself included


class RaftNode:
    """Owns the pysyncobj instance, its tick thread, the journal and snapshot hooks."""

    def __init__(
        self,
        settings: RaftSettings,
        store: QueueStore,
        machine: QueueStateMachine,
        loop: asyncio.AbstractEventLoop,
        on_status_change: Callable[[RaftStatus], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._machine = machine
        self._loop = loop
        self._on_status_change = on_status_change
        self._snapshot_path = settings.data_dir / "snapshot.bin"
        self._logstore = LogStore(settings.data_dir / "raft", settings.raft_map_size_mb)
        self._journal = DurableJournal(self._logstore)
        self._reconcile_startup()
        self._completions: deque[tuple[Done, Any, int]] = deque()
        self._tick_actions: deque[Callable[[], None]] = deque()  # run on the tick thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied_written = store.applied_index()
        self.status = RaftStatus("follower", None, 0, 0, 0, False, len(self._journal))
        self._sent_commit = 0
        stored = self._journal.stored_members()
        peers, warning = membership.startup_peers(settings.self_addr, settings.peers, stored)
        if warning:
            log.warning("raft: %s", warning)
        self.start_peers = peers  # what this start uses: the stored list, else --peers
        fresh = len(self._journal) == 1 and self._journal[0][1] == 1
        self._joining = settings.join and stored is None and fresh
        self._sync = _SyncObj(self, settings.self_addr, peers, self._conf(), self._journal)
        self._adopt_journal()
        self._journal.applied_index = lambda: int(self._sync.raftLastApplied)
        self._ledger = membership.MemberLedger(
            [settings.self_addr, *peers], self._store.applied_index(), self._membership_entries
        )
        # A node that starts from nothing seeds its list from --peers; the entry that adds
        # it carries the cluster's list, which it adopts (see _adopt_own_add).
        self._own_add_pending = fresh and stored is None
        self._own_add_scanned = self._journal[-1][1]
        self._journal.members = self._members_to_store
        self._guard_membership()
        # Runs inside every tick, after apply and before the poll: commit, fsync, release
        # acks and answer callers *before* the tick sleeps, not a poll timeout later.
        self._sync.addOnTickCallback(self._after_tick)

    # -- construction ------------------------------------------------------------
    def _conf(self) -> Any:
        s = self._settings
        max_s = s.election_timeout_max_ms / 1000
        return SyncObjConf(
            autoTick=False,
            password=s.secret,
            journalFile=None,
            fullDumpFile=str(self._snapshot_path),
            serializer=self._serialize,
            deserializer=self._deserialize,
            raftMinTimeout=s.election_timeout_min_ms / 1000,
            raftMaxTimeout=max_s,
            appendEntriesPeriod=s.heartbeat_ms / 1000,
            leaderFallbackTimeout=max(s.leader_fallback_ms / 1000, 2 * s.heartbeat_ms / 1000),
            connectionTimeout=max(3.5, 2 * max_s),
            connectionRetryTime=0.5,
            logCompactionMinEntries=s.log_compaction_min_entries,
            logCompactionMinTime=s.log_compaction_min_time_s,
            commandsWaitLeader=False,
            appendEntriesUseBatch=True,
            dynamicMembershipChange=True,
            maxBindRetries=20,
            bindRetryTime=0.5,
        )

    def _reconcile_startup(self) -> None:
        """Make the journal and the LMDB state agree after a crash at any point."""
        applied = self._store.applied_index()
        first, last = self._journal[0][1], self._journal[-1][1]
        if first <= applied + 1 and applied <= last:
            return
        header = snapshot.read_header(self._snapshot_path)
        if applied + 1 < first:
            if header.index + 1 < first:
                raise CorruptDataError(
                    f"state is at index {applied} but the log starts at {first} and the "
                    f"snapshot at {header.index}: this data dir cannot catch up; move it "
                    "away and restart the node to resync from its peers"
                )
            log.warning("state behind log start (%d < %d): restoring snapshot", applied, first)
            snapshot.install(self._snapshot_path, self._store)
            applied = header.index
        if applied > last:
            if header.index != applied:
                raise CorruptDataError(f"state at {applied} is ahead of the log end {last}")
            log.warning("log behind state (%d > %d): resetting log to snapshot", last, applied)
            self._journal.reset([header.prev, header.last])
            self._journal.set_members(header.cluster)  # the list that log leads to

    def _adopt_journal(self) -> None:
        """Swap our journal into pysyncobj (it built a MemoryJournal before we could)."""
        j, s = self._journal, self._sync
        applied = max(self._store.applied_index(), 1)
        s._SyncObj__raftLog = j
        s._SyncObj__raftCurrentTerm = max(j.getCurrentTerm(), j[-1][2])
        s._SyncObj__votedForNodeId = j.getVotedForNodeId()
        s._SyncObj__raftCommitIndex = min(max(j.getRaftCommitIndex(), applied), j[-1][1])
        s._SyncObj__raftLastApplied = applied
        s._SyncObj__needLoadDumpFile = False

    def _guard_membership(self) -> None:
        """Membership changes only through `change_membership`, and no elections while joining."""
        transport = self._sync._SyncObj__transport

        def refuse(_args: Any, callback: Callable[[Any, int], None]) -> None:
            callback(None, FAIL_REASON.REQUEST_DENIED)

        # pysyncobj also takes add/remove as utility messages on the Raft port (its
        # syncobj_admin tool), which would skip our one-change-at-a-time checks.
        transport.setOnUtilityMessageCallback("add", refuse)
        transport.setOnUtilityMessageCallback("remove", refuse)
        if self._joining:
            # A node nobody knows yet reaches its peers for a moment on every reconnect
            # and would start an election each time; added later, its higher term
            # would depose the leader. The first append-entries resets this deadline.
            self._sync._SyncObj__raftElectionDeadline = float("inf")
            log.info("raft: joining; no elections until a leader adds this node")

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raft-tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sync._doDestroy()
        self._logstore.close()

    # -- submission (any thread) -----------------------------------------------------
    def submit_entry(self, entry: bytes, done: Done) -> None:
        def on_result(result: Any, err: int) -> None:
            self._completions.append((done, result, err))

        self._sync.mq_apply(entry, callback=on_result)
        self.wake()

    def wake(self) -> None:
        try:
            self._sync._mq_notifier.notify()
        except BlockingIOError:
            pass  # pipe full: the tick is already due to wake

    async def transfer_leadership(self, target: str | None) -> str:
        """Ask pysyncobj to hand leadership to `target` (or the most caught-up follower).

        Runs on the tick thread (pysyncobj is not thread-safe). Returns "requested",
        "denied" (not leader, target unknown or not caught up) or "timeout".
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def answer(result: str) -> None:
            if not done.done():
                done.set_result(result)

        def in_tick() -> None:
            def callback(_res: Any, err: int) -> None:
                ok = err == FAIL_REASON.SUCCESS
                loop.call_soon_threadsafe(answer, "requested" if ok else "denied")

            try:
                self._sync.transferLeadership(target, callback)
            except ValueError:  # pysyncobj parses the address; never let it break the tick
                loop.call_soon_threadsafe(answer, "denied")

        self._tick_actions.append(in_tick)
        self.wake()
        try:
            return await asyncio.wait_for(done, 5.0)
        except TimeoutError:
            return "timeout"

    async def change_membership(
        self, op: str, addr: str, timeout_s: float, target_up: bool = False
    ) -> list[str]:
        """Add or remove one member (op "add"/"remove"); the new member list once committed.

        `target_up`: the caller saw the node being added accept a connection.
        Runs the checks of `membership.plan` and the append on the tick thread, so
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
                new_members = membership.plan(op, addr, self._leader_view(), target_up)
            except MembershipError as exc:
                loop.call_soon_threadsafe(answer, exc)
                return

            def callback(_res: Any, err: int) -> None:
                if err == FAIL_REASON.SUCCESS:
                    loop.call_soon_threadsafe(answer, new_members)
                else:
                    why = _FAIL_NAMES.get(err, str(err))
                    failed = MembershipError("failed", f"{op} {addr} not committed: {why}")
                    loop.call_soon_threadsafe(answer, failed)

            if op == membership.ADD:
                # pysyncobj pickles this node object into the entry: the list rides along.
                self._sync.addNodeToCluster(TCPNode(addr, mq_members=new_members), callback)
            else:
                self._sync.removeNodeFromCluster(addr, callback)
            # Append now, while this node is still the leader that ran the checks: queued,
            # it would go out after the next poll, and a follower forwards queued
            # commands to whoever leads then, past these checks.
            self._sync._checkCommandsToApply()
            log.info("raft: membership change %s %s appended", op, addr)

        self._tick_actions.append(in_tick)
        self.wake()
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            raise MembershipError(
                "timeout",
                f"{op} {addr} not committed within {timeout_s:g}s; it may still commit "
                "(or be dropped by the next leader): check mqnode cluster status",
            ) from None

    def _leader_view(self) -> membership.LeaderView:
        """The leader's side of `membership.plan` (tick thread); MembershipError if not leader."""
        sync = self._sync
        if not sync._isLeader():
            leader = sync._getLeader()
            addr = None if leader is None else str(leader.address)
            raise MembershipError(
                "not_leader", f"not the leader; the leader is {addr or 'unknown'}", addr
            )
        others = sync._SyncObj__otherNodes
        since = _pysyncobj_now() - sync.conf.leaderFallbackTimeout
        last_response = sync._SyncObj__lastResponseTime
        answered = {n.address for n in others if last_response.get(n, since) > since}
        noop = sync._SyncObj__noopIDx
        return membership.LeaderView(
            self_addr=self._settings.self_addr,
            members=frozenset(self._members()),
            responsive=frozenset({self._settings.self_addr, *answered}),
            first_entry_committed=noop is not None and sync.raftLastApplied >= noop,
            pending=tuple(self._membership_entries(sync.raftCommitIndex, None)),
        )

    def _membership_entries(self, index: int, upto: int | None) -> list[membership.Change]:
        """(op, addr) of the membership entries in the log in (index, upto], oldest first."""
        j = self._journal
        first = j[0][1]
        end = len(j) if upto is None else max(min(upto + 1 - first, len(j)), 0)
        out: list[membership.Change] = []
        for pos in range(max(index + 1 - first, 0), end):
            cmd = j[pos][0]
            if cmd[0] == _MEMBERSHIP_TYPE:  # an int compare: this runs over the log's tail
                request = _pysyncobj_unpickle(cmd[1:])
                out.append((_MEMBERSHIP_OPS.get(request[0], request[0]), str(request[1])))
        return out

    def _members(self) -> list[str]:
        """This node's current member list (tick thread): the latest in its log."""
        others = self._sync._SyncObj__otherNodes
        return sorted([self._settings.self_addr, *(n.address for n in others)])

    def _adopt_own_add(self) -> None:
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
            if cmd[0] != _MEMBERSHIP_TYPE:
                continue
            request = _pysyncobj_unpickle(cmd[1:])
            listed = getattr(request[2], "mq_members", None) if len(request) > 2 else None
            if request[0] != "add" or request[1] != me or not listed:
                continue
            idx = j[pos][1]
            self._ledger.rebase(listed, idx)
            now = self._ledger.at(last)
            if now != self._members():
                log.error(
                    "raft: the member list this node started with (%s) is not the cluster's "
                    "(%s, from the entry that added it); using the cluster's",
                    ", ".join(self._members()),
                    ", ".join(now),
                )
                self._sync._SyncObj__updateClusterConfiguration([m for m in now if m != me])
            self._own_add_pending = False
            return

    def _members_to_store(self) -> list[str] | None:
        """What the journal stores with each write (every tick): the list at the log's end."""
        if self._joining:
            return None
        _, idx, term = self._journal[-1]
        return self._ledger.at_end(idx, term)

    def set_partition(self, blocked_peers: list[str]) -> None:
        """Fault injection: drop all Raft traffic to and from these peer addresses."""
        self._sync._SyncObj__transport.mq_blocked = frozenset(blocked_peers)

    def force_compaction(self) -> None:
        self._sync.forceLogCompaction()

    # -- the tick thread -----------------------------------------------------------------
    def _apply(self, entry: bytes) -> list[Result] | None:
        index = self._sync.raftLastApplied + 1
        return self._machine.apply(index, entry, self._store.apply_txn())

    def _run(self) -> None:
        tick_s = min(self._settings.heartbeat_ms / 2000, 0.05)
        while not self._stop.is_set():
            try:
                self._sync.doTick(tick_s)
            except Exception:
                log.exception("raft tick failed; rolling back this tick's applies")
                self._roll_back()
                self._stop.wait(0.2)

    def _after_tick(self) -> None:
        sync = self._sync
        if self._joining and sync._getLeader() is not None:
            self._joining = False  # a leader reached us: we are a member now
            log.info("raft: joined; leader %s", sync._getLeader().address)
        if self._own_add_pending:
            self._adopt_own_add()
        while self._tick_actions:
            action = self._tick_actions.popleft()
            try:
                action()
            except Exception:  # an operator request must never cost a tick's flush
                log.exception("admin action on the tick thread failed")
        # Journal first: a follower may apply entries it appended in the previous poll but
        # has not flushed yet. Flushing after the state commit let a crash in between leave
        # the state ahead of the log (seen in the staggered full-restart chaos run).
        appended = self._journal.flush()
        last_applied = sync.raftLastApplied
        if last_applied > self._applied_written:
            txn = self._store.apply_txn()
            if txn.applied_index() < last_applied:
                txn.set_applied_index(last_applied)  # entries we never see (no-ops) count too
        self._store.commit_apply()
        self._applied_written = last_applied
        self._ledger.advance(last_applied)
        transport = sync._SyncObj__transport
        transport.release_deferred()
        resend, transport.mq_resend = transport.mq_resend, False
        if sync._isLeader() and (appended or resend or sync.raftCommitIndex != self._sent_commit):
            # Replicate new entries and tell followers the new commit index now, not at
            # the next heartbeat: followers answer their own SMTP sessions after applying.
            self._sent_commit = sync.raftCommitIndex
            sync._SyncObj__sendAppendEntries()
        self._deliver_completions(failed=False)
        self._publish_status()

    def _roll_back(self) -> None:
        self._store.abort_apply()
        committed = self._store.applied_index()
        self._sync._SyncObj__raftLastApplied = max(committed, self._journal[0][1])
        self._applied_written = committed
        self._deliver_completions(failed=True)

    def _deliver_completions(self, failed: bool) -> None:
        items: list[tuple[Done, Any, str | None]] = []
        while self._completions:
            done, result, err = self._completions.popleft()
            if failed and err == FAIL_REASON.SUCCESS:
                items.append((done, None, "apply_failed"))
            elif err == FAIL_REASON.SUCCESS:
                items.append((done, result, None))
            else:
                items.append((done, None, _FAIL_NAMES.get(err, str(err))))
        if items:
            self._loop.call_soon_threadsafe(_run_completions, items)

    def _publish_status(self) -> None:
        sync = self._sync
        leader = sync._getLeader()
        status = RaftStatus(
            role=_ROLES.get(sync._SyncObj__raftState, "unknown"),
            leader_addr=None if leader is None else leader.address,
            term=sync.raftCurrentTerm,
            commit_index=sync.raftCommitIndex,
            last_applied=sync.raftLastApplied,
            has_quorum=sync.hasQuorum,
            log_len=len(self._journal),
            match_index={
                node.address: int(idx) for node, idx in sync._SyncObj__raftMatchIndex.items()
            }
            if sync._isLeader()
            else {},
            members=tuple(self._members()),
        )
        old, self.status = self.status, status
        changed = (old.role, old.leader_addr, old.term) != (
            status.role,
            status.leader_addr,
            status.term,
        )
        if changed and self._on_status_change is not None:
            self._loop.call_soon_threadsafe(self._on_status_change, status)

    # -- snapshot hooks (tick thread, called by pysyncobj) ------------------------------------
    def _serialize(self, filename: str, data: Any) -> None:
        last, prev, _cluster = data
        txn = self._store.apply_txn()
        if txn.applied_index() < last[1]:
            txn.set_applied_index(last[1])
        self._store.commit_apply()
        # pysyncobj passes its current member list (`_cluster`), which includes membership
        # entries appended after the snapshot's index, perhaps never to commit. A follower
        # installing the snapshot must get the list *at* that index: the later entries
        # reach it with the log, and are undone there if a new leader drops them.
        members = self._ledger.at(int(last[1]))
        snapshot.write_snapshot(
            Path(filename),
            self._store,
            (bytes(last[0]), int(last[1]), int(last[2])),
            (bytes(prev[0]), int(prev[1]), int(prev[2])),
            members,
        )
        log.info("snapshot written at index %d", last[1])

    def _deserialize(self, filename: str) -> tuple[Entry, Entry, list[str]]:
        try:
            self._store.commit_apply()
        except StoreFullError:
            self._store.abort_apply()
        header = snapshot.install(Path(filename), self._store)
        self._applied_written = header.index
        self._ledger.reset(header.cluster, header.index)
        if self._settings.self_addr in header.cluster:
            self._own_add_pending = False  # the leader's list names us: nothing to adopt
        log.info("installed snapshot at index %d from the leader", header.index)
        # pysyncobj drops this node from the list by comparing Node objects; ours are
        # addresses, so it would keep itself as a peer and count itself twice.
        others = [m for m in header.cluster if m != self._settings.self_addr]
        return header.last, header.prev, others


def _run_completions(items: list[tuple[Done, Any, str | None]]) -> None:
    for done, result, err in items:
        done(result, err)
