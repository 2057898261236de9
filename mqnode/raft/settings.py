"""RaftSettings (what a RaftNode is built from) and RaftStatus (what it publishes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pysyncobj's appendEntriesBatchSizeBytes: an entry this big or bigger would go out in
# pieces, whose last-piece test compares against the wrong length (spool/commands.py), so
# every entry must stay below it; packing stops at the cluster's EntrySizes.max_entry.
APPEND_BATCH_BYTES = 2 * 1024 * 1024

# Called on the asyncio loop: (what the state machine's apply returned, None) once committed
# and applied, else (None, reason). raft/ never reads the results (contracts.py).
Done = Callable[[Any, str | None], None]


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
    # While busy, new entries go to followers at most once per this many ms (0: every tick).
    replication_batch_ms: int = 0


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
    # Seconds since each peer's Raft connection last delivered anything; None: not connected.
    peer_last_heard_s: dict[str, float | None] = field(default_factory=dict)
    # The log length that triggers the next snapshot (compaction.py: grows with the state).
    snapshot_after_entries: int = 0
    # The log's first index (the last snapshot's, once compacted) and its last index.
    log_first_index: int = 0
    log_last_index: int = 0
    # A follower: seconds since the last append_entries of a leader of its term; None:
    # none since the connection to the leader last closed (or this node leads).
    leader_heard_s: float | None = None
    # Peers with the cluster secret that introduced themselves as members recently but are
    # not in this node's member list (raft/member_lists.py says what that means).
    unlisted_peers: tuple[str, ...] = ()
    # The leader another member named when it refused this node's pre-vote (prevote.py).
    leader_named_by_others: str | None = None
