"""The Raft adapter: the only package that imports pysyncobj (pinned to 0.3.17).

Modules:
* node.py: RaftNode, the pysyncobj instance and its tick thread; submit.
* contracts.py: the Protocols the replicated state implements (StateMachine,
  StateStore); nothing here imports the queue's classes for them.
* commit_pipeline.py: group commit between asyncio callers and the log, with
  its own deadlines; formats.py: which command fields the members can read.
* journal.py (DurableJournal) over logstore.py (the journal in LMDB).
* snapshots.py (pysyncobj's dump hooks, startup repair, compaction pace),
  snapshot_writer.py (copies on a thread of their own), snapshot_file.py (the
  file format), compaction.py (how long the log may grow).
* membership.py (Membership: the member list and its changes),
  membership_rules.py (the pure rules of a change), member_lists.py (do the
  members agree on the list?).
* transport.py (DeferringTransport: acks held until durable, keep-alives),
  wire.py (cheaper framing), guarded.py (a bounded reader for the Raft port),
  pacing.py (when the leader sends), prevote.py (no election without a
  majority's pre-vote), unanswered.py (fails the callbacks pysyncobj would
  never make), types.py (RaftSettings, RaftStatus).
* internals.py: the only module touching pysyncobj's private names; checks
  its exact version at import.

Everything else in mqnode talks to Raft through RaftNode and the commit
pipeline.

What it promises
* `submit_entry(entry, done)` appends one entry; `done(results, None)` runs on
  the asyncio loop only after the entry is committed by a majority, applied to
  LMDB *and that LMDB transaction is committed*; otherwise `done(None, reason)`.
  It is called at most once. Commands pysyncobj would never answer (a
  forwarded command lost with its connection, one a snapshot install jumped
  over) get `unknown_outcome` (unanswered.py), but callers must still keep
  their own deadline and free what they hold by it (the commit pipeline
  does): nothing guarantees the call.
  With `early=True` (SMTP ingress, which never reads the state after the
  answer) `done` runs once the entry is committed and on disk in this node's
  journal, before the state's commit; `on_applied` runs after each state
  commit that moved on (the dispatcher's wake-up). Readers that must see what
  was answered (the admin endpoint's queue reads) await `answered_readable`
  first: at most the rest of a tick.
* An entry counts toward commit on a follower only after it is fsynced there:
  acknowledgements (`next_node_idx`) are held back until the journal flush,
  which a follower does before each tick, so acks do not wait for applies.
  Term and vote are written synchronously before any vote is sent.
* At most one fsync per tick for the journal and one LMDB commit for the
  state, however many entries the tick carried (group commit). State commits
  are not fsynced: after a kernel crash the state is rebuilt from snapshot.bin
  and the journal (spool/store.py), which is why a state commit never runs ahead of
  the journal and a snapshot downloaded from the leader is fsynced before the
  journal is reset past it. While busy, the leader sends
  new entries at most once per `replication_batch_ms` (pacing.py), so each
  follower round carries more, and fsyncs its journal only in a tick after
  entries went out (an entry held back cannot be committed before it is sent).

What it assumes about pysyncobj (each item is a workaround, see
docs/design/replication.md):
* We run its tick loop ourselves (`autoTick=False`) so that we can flush and
  release acks between ticks.
* Its journal is replaced by `DurableJournal` right after construction; its
  own FileJournal does not fsync and its dump-file loader drops entries.
* Its startup dump-file load is disabled; the LMDB state (with its applied
  index) is the snapshot, and the journal holds everything after it.
* Snapshots go through its serializer/deserializer hooks as `raft/snapshot_file.py`
  files; installing one replaces the LMDB state.
* Membership changes (`change_membership`) are its dynamic membership: an
  entry takes effect when appended. The member list it leads to is stored in
  the journal's metadata with every journal write, and wins over `--peers` at
  the next start (applied entries are never replayed here, so pysyncobj's own
  restore-by-replay does not happen).
"""

from mqnode.raft.journal import MEMBERSHIP, NO_OP, DurableJournal, Entry
from mqnode.raft.node import RaftNode
from mqnode.raft.settings import Done, RaftSettings, RaftStatus

__all__ = [
    "MEMBERSHIP",
    "NO_OP",
    "Done",
    "DurableJournal",
    "Entry",
    "RaftNode",
    "RaftSettings",
    "RaftStatus",
]
