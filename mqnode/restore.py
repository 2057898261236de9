"""Disaster recovery: a node's data dir rebuilt from one `snapshot.bin`, as a one-node cluster.

    mqnode restore --snapshot FILE --config n1.toml      (or the run flags)

For the day every data dir is lost but a copy of some node's
`DATA_DIR/snapshot.bin` survives. The new data dir gets the queue state
inside it (size and CRC checked before anything is written), a Raft log
that starts at the snapshot's index and term, a member list of this node
alone, and the snapshot written again with that list (the copy names the
old members, and added nodes would take them from it). Started with no peers, it leads at once;
`mqnode cluster add-node` then grows the cluster (new nodes start empty
with `join = true` and catch up from its snapshot).

The restore goes into the audit trail (admin/audit.py) as the principal
`restore`: the node commits the record left in PENDING_AUDIT once it can.

What it cannot give back: mail acknowledged after the snapshot was taken
is not in it, and mail delivered after it is queued again (it will be sent
again). Refuses a data dir that already holds a queue state or a log.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mqnode.clock import Clock, SystemClock
from mqnode.errors import ConfigError
from mqnode.raft.journal import DurableJournal
from mqnode.raft.logstore import LogStore
from mqnode.raft.snapshot_file import SnapshotHeader, install, read_header, write_snapshot
from mqnode.spool.store import QueueStore
from mqnode.storage import fsync_path

PENDING_AUDIT = "audit-pending.json"  # in the data dir: a record for the audit trail


def restore_data_dir(
    snapshot_file: Path,
    data_dir: Path,
    raft_addr: str,
    state_map_size_mb: int,
    raft_map_size_mb: int,
    clock: Clock | None = None,
) -> SnapshotHeader:
    state_dir, raft_dir = data_dir / "state", data_dir / "raft"
    for d in (state_dir, raft_dir):
        if d.exists() and any(d.iterdir()):
            raise ConfigError(f"{d} is not empty: restore only into a new, empty data dir")
    header = read_header(snapshot_file)  # CorruptDataError if damaged
    data_dir.mkdir(parents=True, exist_ok=True)
    copy = data_dir / "snapshot.bin"
    if snapshot_file.resolve() != copy.resolve():
        shutil.copyfile(snapshot_file, copy)
    fsync_path(copy)
    store = QueueStore(state_dir, state_map_size_mb)
    try:
        install(copy, store)  # verifies size and CRC before replacing anything
        # The copy names the old cluster's members; this node serves its snapshot.bin to
        # the nodes it adds, which would take that list. Write it again naming this node.
        write_snapshot(copy, store, header.last, header.prev, [raft_addr])
    finally:
        store.close()
    logstore = LogStore(raft_dir, raft_map_size_mb)
    try:
        journal = DurableJournal(logstore)
        journal.reset([header.prev, header.last])
        journal.setCurrentTerm(header.last[2], None)
        journal.set_members([raft_addr])
    finally:
        logstore.close()
    record = {
        "at_ms": (clock or SystemClock()).wall_ms(),
        "principal": "restore",
        "action": "restore",
        "target": f"{snapshot_file} (index {header.index})",
    }
    pending = data_dir / PENDING_AUDIT
    pending.write_text(json.dumps(record), encoding="utf-8")
    fsync_path(pending)
    return header
