"""A RaftNode's snapshots: pysyncobj's dump hooks, startup repair, compaction pace.

pysyncobj calls `SnapshotHooks.serialize` when it compacts the log (we start a
copy of the LMDB state at the entry it names; SnapshotWriter finishes it off the
tick thread) and `SnapshotHooks.deserialize` when a follower installs the
leader's snapshot. `reconcile_startup` makes the journal and the state agree
after a crash at any point between their two commits; `CompactionPace`
snapshots less often while the state is large (compaction.py). All of it runs
on the tick thread. See docs/design/replication.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj.monotonic import monotonic as _pysyncobj_now

from mqnode.errors import CorruptDataError, StoreFullError
from mqnode.raft import snapshot_file
from mqnode.raft.compaction import compaction_min_entries, staggered_threshold
from mqnode.raft.contracts import StateStore
from mqnode.raft.journal import DurableJournal, Entry
from mqnode.raft.logstore import LogStore
from mqnode.raft.settings import RaftSettings
from mqnode.raft.snapshot_writer import SnapshotWriter
from mqnode.storage import fsync_path

log = logging.getLogger("mqnode.raft")

COMPACTION_CHECK_S = 1.0  # how often the snapshot threshold follows the state size


def reconcile_startup(store: StateStore[Any], journal: DurableJournal, snapshot_path: Path) -> None:
    """Make the journal and the LMDB state agree after a crash at any point."""
    applied = store.applied_index()
    first, last = journal[0][1], journal[-1][1]
    if first <= applied + 1 and applied <= last:
        return
    header = snapshot_file.read_header(snapshot_path)
    if applied + 1 < first:
        if header.index + 1 < first:
            raise CorruptDataError(
                f"state is at index {applied} but the log starts at {first} and the "
                f"snapshot at {header.index}: this data dir cannot catch up; move it "
                "away and restart the node to resync from its peers"
            )
        log.warning("state behind log start (%d < %d): restoring snapshot", applied, first)
        snapshot_file.install(snapshot_path, store)
        applied = header.index
    if applied > last:
        if header.index != applied:
            raise CorruptDataError(f"state at {applied} is ahead of the log end {last}")
        log.warning("log behind state (%d > %d): resetting log to snapshot", last, applied)
        journal.reset([header.prev, header.last])
        journal.set_members(header.cluster)  # the list that log leads to


class CompactionPace:
    """How long pysyncobj lets the log grow before its next snapshot (`every`, published)."""

    def __init__(
        self,
        settings: RaftSettings,
        journal: DurableJournal,
        logstore: LogStore,
        store: StateStore[Any],
        members: Callable[[], list[str]],
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._logstore = logstore
        self._store = store
        self._members = members
        self.every = settings.log_compaction_min_entries
        self._next_check = 0.0
        self._rank = (0, 1)  # this member's place among the members, how many
        self._first = -1  # the log's first index when the threshold was last set

    def scale(self, conf: Any) -> None:
        """Set the log length of pysyncobj's next snapshot in its `conf`.

        The period follows the state size (checked ~1/s), the phase this member's place
        among the members (compaction.py); recomputed at once when a snapshot has moved
        the log's start.
        """
        now = _pysyncobj_now()
        first = int(self._journal[0][1])
        if now >= self._next_check:
            self._next_check = now + COMPACTION_CHECK_S
            every = compaction_min_entries(
                self._settings.log_compaction_min_entries,
                len(self._journal),
                self._logstore.used_bytes(),
                self._store.used_bytes(),
                self._logstore.map_bytes,
            )
            if every is not None:
                self.every = every
            members = self._members()
            me = self._settings.self_addr
            self._rank = (members.index(me) if me in members else 0, len(members))
        elif first == self._first:
            return
        self._first = first
        threshold = staggered_threshold(self.every, first, *self._rank)
        if threshold != conf.logCompactionMinEntries:
            log.debug("raft: next snapshot when the log holds %d entries", threshold)
            conf.logCompactionMinEntries = threshold


class SnapshotHooks:
    """pysyncobj's serializer and deserializer, on our LMDB state and snapshot files.

    `members_at(index)` is the member list at a log index; `on_installed` runs
    (tick thread) once a leader's snapshot has replaced the state.
    """

    def __init__(
        self,
        settings: RaftSettings,
        journal: DurableJournal,
        store: StateStore[Any],
        writer: SnapshotWriter,
        members_at: Callable[[int], list[str]],
        on_installed: Callable[[snapshot_file.SnapshotHeader], None],
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._store = store
        self._snapshots = writer
        self._members_at = members_at
        self._on_installed = on_installed

    def serialize(self, _filename: str, data: Any) -> None:
        """Start a snapshot at last[1]; SnapshotWriter copies it off the tick thread.

        pysyncobj then renames its own temporary file name over snapshot.bin; we
        never create that file, so its rename fails (caught inside pysyncobj) and
        our checker (`SnapshotWriter.status`) alone reports the outcome.
        """
        last, prev, _cluster = data
        # Journal first: starting a copy commits the state (store.snapshot_txn), and
        # pysyncobj calls this before our tick's flush, with entries the last poll
        # appended already applied. A kill -9 in between left the state ahead of the
        # log ("state at 8951 is ahead of the log end 8949", chaos with smtp workers).
        self._journal.flush()
        txn = self._store.apply_txn()
        if txn.applied_index() < last[1]:
            txn.set_applied_index(last[1])
        # pysyncobj passes its current member list (`_cluster`), which includes membership
        # entries appended after the snapshot's index, perhaps never to commit. A follower
        # installing the snapshot must get the list *at* that index: the later entries
        # reach it with the log, and are undone there if a new leader drops them.
        members = self._members_at(int(last[1]))
        self._snapshots.start(
            self._store,
            (bytes(last[0]), int(last[1]), int(last[2])),
            (bytes(prev[0]), int(prev[1]), int(prev[2])),
            members,
        )

    def deserialize(self, filename: str) -> tuple[Entry, Entry, list[str]]:
        self._snapshots.discard()  # ours must not replace the leader's, nor hold the store
        # pysyncobj renames the download into place unsynced; the journal is about to be
        # reset past its own entries, so this file is what a state lost in a kernel crash
        # would be rebuilt from (spool/store.py): durable first.
        fsync_path(Path(filename))
        fsync_path(Path(filename).parent)
        self._journal.flush()  # journal first, as in _serialize: never state ahead of log
        try:
            self._store.commit_apply()
        except StoreFullError:
            self._store.abort_apply()
        header = snapshot_file.install(Path(filename), self._store)
        self._on_installed(header)
        log.info("installed snapshot at index %d from the leader", header.index)
        # pysyncobj drops this node from the list by comparing Node objects; ours are
        # addresses, so it would keep itself as a peer and count itself twice.
        others = [m for m in header.cluster if m != self._settings.self_addr]
        return header.last, header.prev, others
