"""RaftNode: owns the pysyncobj instance, its tick thread, the journal and the snapshot hooks.

See the package docstring (mqnode/raft/__init__.py) for what it promises and
what it assumes about pysyncobj.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated
from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.syncobj import _RAFT_STATE

from mqnode.errors import ConfigError, JournalDamagedError, MqnodeError, NewerFormatError
from mqnode.raft import membership_rules
from mqnode.raft.contracts import StateMachine, StateStore, TxnT
from mqnode.raft.guarded import install as install_guarded_connections
from mqnode.raft.handover import AppendHold, retry_while_behind
from mqnode.raft.internals import SyncInternals
from mqnode.raft.journal import DurableJournal
from mqnode.raft.logstore import LogStore
from mqnode.raft.membership import FAIL_NAMES, Membership
from mqnode.raft.pacing import AppendPacer, StateCommitPacer, follower_waits
from mqnode.raft.prevote import PreVoteGate
from mqnode.raft.settings import APPEND_BATCH_BYTES, Done, RaftSettings, RaftStatus
from mqnode.raft.snapshot_file import SnapshotHeader
from mqnode.raft.snapshot_writer import SnapshotWriter
from mqnode.raft.snapshots import CompactionPace, SnapshotHooks, reconcile_startup
from mqnode.raft.transport import DeferringTransport
from mqnode.raft.unanswered import UnansweredCommands
from mqnode.raft.wire import install as install_cheap_framing

log = logging.getLogger("mqnode.raft")

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
# A follower commits its state at most this often while busy (pacing.StateCommitPacer).
FOLLOWER_STATE_COMMIT_S = 0.025
# answered_readable: how long a read waits for the state's commit, and how often it looks.
STATE_READ_WAIT_S = 1.0
STATE_READ_POLL_S = 0.002
FOLLOWER_STATE_HOLD_MAX_FILL = 0.5  # a fuller state map commits every tick
# SO_SNDBUF / SO_RCVBUF of the Raft links (pysyncobj sets both, which turns off the
# kernel's autotuning; its 64 KiB default took a 2 MiB append batch in 16+ sends and
# held a link to 64 KiB per round trip). The kernel caps it at net.core.[rw]mem_max.
SOCKET_BUFFER_BYTES = 1024 * 1024
UNLISTED_FOR_S = 30.0  # how long an unlisted peer's introduction counts (it retries ~2/s)
STATUS_SLOW_EVERY_S = 0.05  # RaftStatus's operator fields: see _publish_status
# A leadership transfer to a follower that is not caught up is asked again this often, for
# this long (RaftNode.transfer_leadership); new entries wait meanwhile (handover.py), so a
# reachable follower catches up within a round trip and a fsync.
TRANSFER_PAUSE_S = 0.05
TRANSFER_RETRY_S = 1.0
_LEADER = _RAFT_STATE.LEADER


def refused_for_log(message: dict[str, Any], term: int, ours: tuple[int, int]) -> bool:
    """Whether a vote request of our current term lost only because our log is ahead.

    `ours` is (last log term, last log index); Raft's up-to-date rule compares
    exactly that pair.
    """
    if message.get("term") != term:
        return False
    theirs = (message.get("last_log_term"), message.get("last_log_index"))
    if not all(isinstance(v, int) for v in theirs):
        return False
    return ours > theirs


class _SyncObj(SyncObj):  # type: ignore[misc]
    def __init__(
        self,
        owner: RaftNode[Any],
        self_addr: str,
        peers: list[str],
        conf: Any,
        journal: DurableJournal,
    ) -> None:
        self._mq_owner = owner
        self._mq_journal = journal
        super().__init__(self_addr, peers, conf, transportClass=DeferringTransport)
        self._mq_notifier = PipeNotifier(SyncInternals(self).poller)

    @replicated  # type: ignore[untyped-decorator]
    def mq_apply(self, entry: bytes) -> Any:
        return self._mq_owner._apply(entry)

    def _mq_after_vote_request(self, message: dict[str, Any]) -> None:
        """Stand for election at once after refusing a candidate whose log is behind ours.

        pysyncobj refuses such a vote silently and leaves this node's election timer
        as it was, so after a leader crash the follower that happened to time out
        first, if it had fewer entries, cost a whole second timeout before the
        up-to-date one stood (seen as a second election round in the failover
        bench). The candidate's higher term has already deposed any leader, so
        standing now only shortens the gap; Raft's vote rule keeps it safe.
        """
        if self._mq_owner.membership.joining:
            return
        raw = SyncInternals(self)
        if raw.state == _LEADER or raw.voted_for is not None:
            return  # voted in this term (for it, another or ourselves): nothing to fix
        ours = (raw.last_log_term(), raw.last_log_index())
        if refused_for_log(message, self.raftCurrentTerm, ours):
            raw.election_deadline = 0.0


class RaftNode(Generic[TxnT]):
    """Owns the pysyncobj instance, its tick thread, the journal and snapshot hooks.

    Its parts, each built here and given what it needs: `Membership` (membership.py),
    `SnapshotHooks` and `CompactionPace` (snapshots.py), `PreVoteGate` (prevote.py),
    `UnansweredCommands` (unanswered.py), the pacers (pacing.py).
    """

    def __init__(
        self,
        settings: RaftSettings,
        store: StateStore[TxnT],
        machine: StateMachine[TxnT],
        loop: asyncio.AbstractEventLoop,
        on_status_change: Callable[[RaftStatus], None] | None = None,
    ) -> None:
        install_cheap_framing()  # process-wide, idempotent: see wire.py
        install_guarded_connections()  # likewise: see guarded.py
        self._settings = settings
        self._store = store
        self._machine = machine
        self._loop = loop
        self._on_status_change = on_status_change
        self._snapshot_path = settings.data_dir / "snapshot.bin"
        self._snapshots = SnapshotWriter(self._snapshot_path)
        self._logstore = LogStore(settings.data_dir / "raft", settings.raft_map_size_mb)
        self._journal = DurableJournal(self._logstore)
        reconcile_startup(store, self._journal, self._snapshot_path)
        self._snapshot_hooks = SnapshotHooks(
            settings,
            self._journal,
            store,
            self._snapshots,
            members_at=lambda index: self.membership.ledger.at(index),
            on_installed=self._on_snapshot_installed,
        )
        self._completions: deque[tuple[Done, Any, int, bool]] = deque()
        self._tick_actions: deque[Callable[[], None]] = deque()  # run on the tick thread
        self._hold: AppendHold[tuple[bytes, Done, bool]] = AppendHold()  # during a handover
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied_written = store.applied_index()
        self.status = RaftStatus("follower", None, 0, 0, 0, False, len(self._journal))
        self._status_slow_due = float("-inf")
        self._status_peers = -1
        self._sent_commit = 0
        self._sent_upto = 0
        # Called on the event loop after the state moved on and is readable (e.g. wake
        # the dispatcher: answers to callers go out before the state commit).
        self.on_applied: Callable[[], None] = lambda: None
        # Called on the loop when this node stops applying for good (NewerFormatError).
        self.on_fatal: Callable[[MqnodeError], None] = lambda exc: None
        self._pacer = AppendPacer(settings.replication_batch_ms / 1000)
        self._state_pacer = StateCommitPacer(FOLLOWER_STATE_COMMIT_S)
        self._map_cap_logged = False
        self._poll_until = 0.0  # when the poll after the current tick ends at the latest
        stored = self._journal.stored_members()
        peers, warning = membership_rules.startup_peers(settings.self_addr, settings.peers, stored)
        if warning:
            log.warning("raft: %s", warning)
        self.start_peers = peers  # what this start uses: the stored list, else --peers
        fresh = len(self._journal) == 1 and self._journal[0][1] == 1
        joining = settings.join and stored is None and fresh
        conf = self._conf()
        # Well inside pysyncobj's idle-connection timeout (see DeferringTransport.keep_alive).
        self._keepalive_s = conf.connectionTimeout / 4
        try:
            self._sync = _SyncObj(self, settings.self_addr, peers, conf, self._journal)
        except SyncObjException as exc:  # pysyncobj's BindError, after its bind retries
            self._logstore.close()
            raise ConfigError(
                f"raft_addr: cannot listen on {settings.self_addr} ({exc}): in use, or not "
                "an address of this host"
            ) from exc
        self._raw = SyncInternals(self._sync)
        self._unanswered = UnansweredCommands(self._sync)
        self._adopt_journal()
        self._journal.applied_index = lambda: int(self._sync.raftLastApplied)
        self.membership = Membership(
            self._sync,
            settings,
            self._journal,
            [settings.self_addr, *peers],
            self._store.applied_index(),
            joining=joining,
            fresh=fresh and stored is None,
            run_on_tick=self._run_on_tick,
        )
        self._journal.members = self.membership.to_store
        self.membership.guard()
        self._prevote = PreVoteGate(
            self._sync, self._raw, float(conf.raftMinTimeout), lambda: self.membership.joining
        )
        self._compaction = CompactionPace(
            settings, self._journal, self._logstore, store, self.membership.current
        )
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
            serializer=self._snapshot_hooks.serialize,
            serializeChecker=self._snapshots.status,
            deserializer=self._snapshot_hooks.deserialize,
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
            appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES,
            sendBufferSize=SOCKET_BUFFER_BYTES,
            recvBufferSize=SOCKET_BUFFER_BYTES,
            dynamicMembershipChange=True,
            maxBindRetries=20,
            bindRetryTime=0.5,
        )

    def _adopt_journal(self) -> None:
        """Swap our journal into pysyncobj (it built a MemoryJournal before we could)."""
        j = self._journal
        applied = max(self._store.applied_index(), 1)
        self._raw.adopt_log(
            j,
            term=max(j.getCurrentTerm(), j[-1][2]),
            voted_for=j.getVotedForNodeId(),
            commit=min(max(j.getRaftCommitIndex(), applied), j[-1][1]),
            applied=applied,
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raft-tick", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sync.destroy()
        self._snapshots.close()
        self._logstore.close()

    # -- submission (any thread) -----------------------------------------------------
    def submit_entry(self, entry: bytes, done: Done, early: bool = False) -> None:
        """Append `entry`; `done` runs on the loop once it is committed and applied.

        Normally after the state's LMDB commit too. With `early`, as soon as it is
        committed and in our journal on disk, before the state's commit (0.2-0.7 ms under
        load, a tenth of the time to a 250): for callers that do not read the state after
        the answer. The journals of a majority hold the entry; a crash before the state
        commit replays it from ours, and a failed state commit rolls back and applies it
        again.
        """

        if self._hold.offer((entry, done, early)):
            return  # a leadership handover runs: submitted when it ends (_after_tick)

        def on_result(result: Any, err: int) -> None:
            self._completions.append((done, result, err, early))

        self._sync.mq_apply(entry, callback=on_result)
        self.wake()

    async def answered_readable(self, timeout_s: float = STATE_READ_WAIT_S) -> None:
        """Return once the state's last commit covers every entry applied when called, so
        that a submission already answered (SMTP's are answered before the state's
        commit: `submit_entry`'s `early`) reads as queued; at most `timeout_s`.

        The gap is the rest of one tick: a few ms, more while the leader sends a big
        entry to its followers. Polled, not signalled: it waits on no callback.
        """
        target = self._sync.raftLastApplied
        if self._applied_written >= target:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._applied_written < target and loop.time() < deadline:
            await asyncio.sleep(STATE_READ_POLL_S)

    async def change_membership(
        self, op: str, addr: str, timeout_s: float, target_up: bool = False
    ) -> list[str]:
        """Add or remove one member: `Membership.change`."""
        return await self.membership.change(op, addr, timeout_s, target_up)

    def _run_on_tick(self, action: Callable[[], None]) -> None:
        self._tick_actions.append(action)
        self.wake()

    def wake(self) -> None:
        try:
            self._sync._mq_notifier.notify()
        except BlockingIOError:
            pass  # pipe full: the tick is already due to wake

    async def transfer_leadership(self, target: str | None) -> str:
        """Ask pysyncobj to hand leadership to `target` (or the most caught-up follower).

        Returns "requested", "denied" (not leader, target unknown or not caught up) or
        "timeout". New entries are held (handover.py) from the first request until another
        node leads or an election timeout has passed, so the target catches up and stays
        as long as the log it is elected on; a target still behind after
        `TRANSFER_RETRY_S` (down, cut off) is denied and the entries go on at once.
        """
        loop = asyncio.get_running_loop()
        now = _pysyncobj_now
        elect_s = self._settings.election_timeout_max_ms / 1000
        self._hold.hold_until(now() + TRANSFER_RETRY_S + 10.0 + elect_s)  # a bound, whatever
        result = "denied"
        try:
            # One tick after the hold began, pysyncobj has appended what came before it.
            await self._ask_on_tick(lambda answer: answer("behind"))
            result = await retry_while_behind(
                lambda: self._ask_transfer(target), loop.time, TRANSFER_RETRY_S, TRANSFER_PAUSE_S
            )
        finally:
            self._hold.hold_until(now() + elect_s if result == "requested" else 0.0)
            self.wake()
        return result

    async def _ask_transfer(self, target: str | None) -> str:
        """One request: "requested", "behind" (pysyncobj's REQUEST_DENIED), "denied"
        (anything else) or "timeout"."""

        def request(answer: Callable[[str], None]) -> None:
            def callback(_res: Any, err: int) -> None:
                result = {FAIL_REASON.SUCCESS: "requested", FAIL_REASON.REQUEST_DENIED: "behind"}
                answer(result.get(err, "denied"))

            try:
                self._sync.transferLeadership(target, callback)
            except ValueError:  # pysyncobj parses the address; never let it break the tick
                answer("denied")

        return await self._ask_on_tick(request)

    async def _ask_on_tick(self, request: Callable[[Callable[[str], None]], None]) -> str:
        """Run `request` on the tick thread (pysyncobj is not thread-safe); it calls the
        answer it is given, from that thread, now or later. "timeout" if it never does."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def answer(result: str) -> None:
            if not done.done():
                done.set_result(result)

        def reply(result: str) -> None:
            loop.call_soon_threadsafe(answer, result)

        self._run_on_tick(lambda: request(reply))
        try:
            return await asyncio.wait_for(done, 5.0)
        except TimeoutError:
            return "timeout"

    def set_partition(self, blocked_peers: list[str]) -> None:
        """Fault injection: drop all Raft traffic to and from these peer addresses."""
        self._raw.transport.mq_blocked = frozenset(blocked_peers)

    def reset_connections(self, peers: list[str]) -> None:
        """Fault injection: close the TCP connections with these peer addresses now (a
        link reset; pysyncobj reconnects). Runs on the tick thread."""
        wanted = frozenset(peers)

        def in_tick() -> None:
            self._raw.transport.disconnect(wanted)

        self._run_on_tick(in_tick)

    def force_compaction(self) -> None:
        self._sync.forceLogCompaction()

    # -- the tick thread -----------------------------------------------------------------
    def _on_leader_link_lost(self) -> None:
        """Tick thread (the transport): the connection to the leader closed."""
        self._prevote.on_leader_link_lost()
        self._unanswered.fail_forwarded("the connection to the leader closed")

    def _on_prevote_message(self, node: Any, message: dict[str, Any]) -> None:
        """Tick thread (the transport's receive path): a pre-vote request or grant."""
        self._prevote.on_message(node, message)

    def _on_older_leader(self, node: Any, term: int) -> None:
        """Tick thread (the transport's receive path): append_entries of an older term."""
        self._prevote.on_older_leader(node, term)

    def _on_snapshot_installed(self, header: SnapshotHeader) -> None:
        self._applied_written = header.index
        self.membership.on_snapshot_installed(header.cluster, header.index)

    def _apply(self, entry: bytes) -> Any:
        index = self._sync.raftLastApplied + 1
        return self._machine.apply(index, entry, self._store.apply_txn())

    def _run(self) -> None:
        tick_s = min(self._settings.heartbeat_ms / 2000, 0.05)
        while not self._stop.is_set():
            try:
                now = _pysyncobj_now()
                wait = min(self._pacer.wait_s(now, tick_s), self._prevote.until_election_s(now))
                self._poll_until = now + wait  # pysyncobj polls this long after the tick
                self._flush_before_tick()
                self._prevote.gate_election()
                self._sync.doTick(wait)
            except NewerFormatError as exc:
                # Rolled back, so the entry stays unapplied in the journal: an upgraded
                # build applies it at the next start. Applying past it would diverge.
                log.critical("raft: cannot apply a committed entry: %s; upgrade mqnode", exc)
                self._roll_back()
                self._stop.set()
                self._loop.call_soon_threadsafe(self.on_fatal, exc)
            except JournalDamagedError as exc:
                # An entry went bad on disk since the start checked them all. Retrying
                # reads it again every tick; the start refuses the log and says what to do.
                log.critical("raft: %s", exc)
                self._roll_back()
                self._stop.set()
                self._loop.call_soon_threadsafe(self.on_fatal, exc)
            except Exception as exc:
                log.exception("raft tick failed; rolling back this tick's applies")
                self._roll_back()
                if self._store.map_filled(exc):
                    self._grow_state_map()
                self._stop.wait(0.2)

    def _flush_before_tick(self) -> None:
        """Flush the journal before the tick counts or applies anything, when needed.

        A follower: what its poll appended, and release the acks for it, so they do
        not wait for the applies the tick starts with (W23). The leader: when a
        resend inside the poll carried entries it had not flushed (the pacer held
        them), so that no ack for them is counted before its own copy is on disk (W22).
        """
        journal = self._journal
        if not journal.dirty or (self._sync._isLeader() and not journal.sent_unflushed):
            return
        journal.flush()
        self._raw.transport.release_deferred()

    def _grow_state_map(self) -> None:
        """Committed entries must apply, or this node could not apply the deletes that
        free space either: grow the state map past its configured size (to at most
        twice it; ingress keeps refusing on the configured size)."""
        if self._snapshots.copying:
            return  # its read transaction must end first; the next failed tick retries
        before = self._store.map_size_bytes
        if self._store.grow_for_apply():
            self._map_cap_logged = False
            log.warning(
                "raft: the queue state map filled while applying committed entries; grown "
                "from %.2f to %.2f MB (state_map_size_mb is the limit ingress refuses at)",
                before / 2**20,
                self._store.map_size_bytes / 2**20,
            )
        elif not self._map_cap_logged:  # once, not every retry
            self._map_cap_logged = True
            log.error(
                "raft: the queue state map is full at %.2f MB, twice state_map_size_mb, and "
                "committed entries cannot apply: restart this node with a larger "
                "state_map_size_mb",
                before / 2**20,
            )

    def _after_tick(self) -> None:
        sync = self._sync
        members = self.membership
        if members.joining and sync._getLeader() is not None:
            members.joining = False  # a leader reached us: we are a member now
            log.info("raft: joined; leader %s", sync._getLeader().address)
        if members.own_add_pending:
            members.adopt_own_add()
        while self._tick_actions:
            action = self._tick_actions.popleft()
            try:
                action()
            except Exception:  # an operator request must never cost a tick's flush
                log.exception("admin action on the tick thread failed")

        def other_leads() -> bool:
            return sync._getLeader() is not None and not sync._isLeader()

        for entry, done, early in self._hold.due(_pysyncobj_now(), other_leads):
            self.submit_entry(entry, done, early)  # pysyncobj forwards them to a new leader
        transport = self._raw.transport
        transport.keep_alive(self._keepalive_s)
        last_applied = sync.raftLastApplied
        # What the leader applied was flushed in earlier ticks (pysyncobj counts entries
        # appended before this tick's commit step only): early callers go first.
        leader_ready = sync._isLeader() and self._journal.durable_through(last_applied)
        if leader_ready:
            self._deliver_completions(failed=False, early_only=True)
        self._replicate(transport)
        if leader_ready:
            # Its callers need only the state; its own journal fsync is for new entries
            # nobody waits on yet.
            self._commit_state(last_applied)
            self._deliver_completions(failed=False)
            if self._leader_flush_due():
                self._journal.flush()
            transport.release_deferred()
        else:
            # Journal first: a follower may apply entries it appended in the previous poll
            # but has not flushed yet. Flushing after the state commit let a crash in between
            # leave the state ahead of the log (seen in the staggered full-restart chaos run).
            self._journal.flush()
            transport.release_deferred()  # acks and votes once durable: before the state commit
            self._deliver_completions(failed=False, early_only=True)
            # Callers still waiting (not early) need the state committed (pacing.py). A
            # transaction held open needs room for every page it copies: none held once the
            # state map is half full (one filling inside apply stops this node applying).
            now = _pysyncobj_now()
            at_once = sync._isLeader() or self._store.fill_ratio() >= FOLLOWER_STATE_HOLD_MAX_FILL
            if self._state_pacer.should_commit(now, at_once, bool(self._completions)):
                self._commit_state(last_applied, refresh_fill=True)
        alone = sync._isLeader() and not self._raw.other_nodes
        if alone and sync.raftCommitIndex < self._journal[-1][1]:
            # No ack wakes the poll to count what this tick appended: without this a
            # single node's commit waited for the next poll timeout (up to 50 ms).
            self.wake()
        self._unanswered.sweep(_pysyncobj_now())
        self._deliver_completions(failed=False)
        self._compaction.scale(sync.conf)
        self._publish_status()

    def _leader_flush_due(self) -> bool:
        """Whether the leader fsyncs its journal this tick.

        Only when entries went out to followers since the last flush, when it has no
        followers, or when a membership entry changed the member list (stored at once,
        so a restart keeps a pending add even while the new member is down). An entry
        the pacer holds back cannot be committed before it is sent, so its fsync waits
        for the round that sends it: one fsync per round, not one per tick (a tick per
        worker submission under load). pysyncobj counts the leader's own copy toward a
        commit at its next tick: after this flush, or for entries a resend inside the
        poll carried, after `_flush_before_tick`.
        """
        journal = self._journal
        return journal.sent_unflushed or not self._raw.other_nodes or journal.members_changed()

    def _replicate(self, transport: Any) -> None:
        """Leader: send new entries and the commit index to followers when pacing allows.

        Now (paced: see pacing.py), not at the next heartbeat: followers answer their own
        SMTP sessions after applying. Sent before our own flush, so the followers' fsyncs
        overlap ours (Raft allows it: pysyncobj counts the leader's copy only at the next
        tick, after it).
        """
        sync = self._sync
        resend, transport.mq_resend = transport.mq_resend, False
        if not sync._isLeader():
            self._pacer.reset()
            return
        commit = sync.raftCommitIndex
        news = self._journal.dirty or commit != self._sent_commit
        waiting = transport.mq_follower_entry
        urgent = resend or follower_waits(waiting, self._sent_upto, self._sent_commit, commit)
        if not self._pacer.should_send(_pysyncobj_now(), news, urgent=urgent):
            # Held back. The poll after this tick was sized before it: wake it if the held
            # entries are due sooner, or every session waits out the poll (50 ms stalls).
            if self._pacer.due_before(self._poll_until):
                self.wake()
            return
        self._sent_commit = commit
        self._sent_upto = self._journal[-1][1]
        self._raw.send_append_entries()

    def _commit_state(self, last_applied: int, refresh_fill: bool = False) -> None:
        advanced = last_applied > self._applied_written
        if advanced:
            txn = self._store.apply_txn()
            if txn.applied_index() < last_applied:
                txn.set_applied_index(last_applied)  # entries we never see (no-ops) count too
        self._store.commit_apply(refresh_fill)
        self._applied_written = last_applied
        self.membership.ledger.advance(last_applied)
        if advanced:
            self._loop.call_soon_threadsafe(self.on_applied)

    def _roll_back(self) -> None:
        self._store.abort_apply()
        committed = self._store.applied_index()
        self._raw.last_applied = max(committed, self._journal[0][1])
        self._applied_written = committed
        self._deliver_completions(failed=True)

    def _deliver_completions(self, failed: bool, early_only: bool = False) -> None:
        if not self._completions:
            return
        items: list[tuple[Done, Any, str | None]] = []
        later: deque[tuple[Done, Any, int, bool]] | None = deque() if early_only else None
        while self._completions:
            done, result, err, early = self._completions.popleft()
            if later is not None and not early:
                later.append((done, result, err, early))
            elif failed and err == FAIL_REASON.SUCCESS:
                items.append((done, None, "apply_failed"))
            elif err == FAIL_REASON.SUCCESS:
                items.append((done, result, None))
            else:
                items.append((done, None, FAIL_NAMES.get(err, str(err))))
        if later is not None:
            self._completions = later
        if items:
            self._loop.call_soon_threadsafe(_run_completions, items)

    def _publish_status(self) -> None:
        """`status` as of this tick, for readers on other threads (admin, readiness, ingress).

        Every tick (hundreds a second under load): role, leader, term, indexes. The
        rest (peer timings, member list, quorum, unlisted peers: ~25 us of a ~35 us
        build) at most every `STATUS_SLOW_EVERY_S`, and at once when the role, leader,
        term or number of members changes. Those fields are for operators and
        readiness, which count in seconds.
        """
        sync, raw, journal = self._sync, self._raw, self._journal
        leader = sync._getLeader()
        is_leader = sync._isLeader()
        old = self.status
        fields: dict[str, Any] = {
            "role": _ROLES.get(raw.state, "unknown"),
            "leader_addr": None if leader is None else leader.address,
            "term": sync.raftCurrentTerm,
            "commit_index": sync.raftCommitIndex,
            "last_applied": self._applied_written,  # in the state readers see
            "log_len": len(journal),
            "match_index": {node.address: int(idx) for node, idx in raw.match_index.items()}
            if is_leader
            else {},
            "log_first_index": int(journal.index_at(0)),
            "log_last_index": int(journal.index_at(-1)),
        }
        changed = (old.role, old.leader_addr, old.term) != (
            fields["role"],
            fields["leader_addr"],
            fields["term"],
        )
        now = _pysyncobj_now()
        peers = len(sync.otherNodes)
        if changed or peers != self._status_peers or now >= self._status_slow_due:
            self._status_slow_due, self._status_peers = now + STATUS_SLOW_EVERY_S, peers
            heard_at = None if is_leader else raw.transport.mq_leader_heard_at
            fields.update(
                has_quorum=sync.hasQuorum,
                members=tuple(self.membership.current()),
                peer_last_heard_s=raw.transport.last_heard(raw.other_nodes),
                snapshot_after_entries=self._compaction.every,
                leader_heard_s=None if heard_at is None else round(now - heard_at, 3),
                unlisted_peers=raw.transport.unlisted_peers(UNLISTED_FOR_S),
                leader_named_by_others=self._prevote.leader_named_by_others(),
            )
        status = object.__new__(RaftStatus)  # a frozen dataclass's __init__ costs ~8 us
        status.__dict__.update(old.__dict__)
        status.__dict__.update(fields)
        self.status = status
        if changed and self._on_status_change is not None:
            self._loop.call_soon_threadsafe(self._on_status_change, status)


def _run_completions(items: list[tuple[Done, Any, str | None]]) -> None:
    for done, result, err in items:
        done(result, err)
