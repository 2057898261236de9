"""Readiness: may a load balancer send this node SMTP traffic now? (`GET /readyz`)

Ready means a submission made here now would be answered 250 in the normal
time. Knowing a leader is not enough: a node can know one, replicate and
apply its entries, and still get none of its own submissions committed (its
forwarded commands lost, its pipeline stuck). So a node is ready only when
all of these hold:

* it has a quorum and knows a leader;
* a follower has heard that leader's append_entries within
  `LEADER_SILENCE_MAX_S`, and a leader has heard from a majority of members
  (itself included) within it (a cut link is noticed before pysyncobj gives
  the connection up, several seconds later);
* no submission begun after the last commit here has timed out; while one
  has, the node probes the commit path (`Node._probe_commits`) and is ready
  again as soon as a probe commits;
* no entry has waited for its commit longer than `STALLED_COMMIT_S`;
* with `smtp_workers`, one of them accepts connections (until then a client
  waits in the listening socket's backlog, after a start about half a second
  of a worker's imports).

Pure: the caller passes what it knows; `assess` reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqnode.raft import RaftStatus
from mqnode.raft.commit_pipeline import PipelineHealth

LEADER_SILENCE_MAX_S = 2.0  # several heartbeats (100 ms) and above an election timeout
STALLED_COMMIT_S = 3.0  # a commit takes milliseconds; this is a stuck one


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]  # why not, for /readyz and logs; empty when ready


def assess(
    status: RaftStatus, health: PipelineHealth, smtp_workers: tuple[int, int] = (0, 0)
) -> Readiness:
    """`smtp_workers`: (accepting connections, configured); (0, 0) without workers."""
    reasons: list[str] = []
    if status.leader_addr is None:
        reasons.append("no leader known")
    elif not status.has_quorum:
        reasons.append("no quorum")
    elif status.role == "leader":
        lately = sum(
            1
            for s in status.peer_last_heard_s.values()
            if s is not None and s <= LEADER_SILENCE_MAX_S
        )
        members = max(len(status.members), len(status.peer_last_heard_s) + 1)
        if (lately + 1) * 2 <= members:
            reasons.append(f"heard from {lately} of {members - 1} peers lately: no majority")
    else:
        heard = status.leader_heard_s
        if heard is None:
            reasons.append("no contact with the leader")
        elif heard > LEADER_SILENCE_MAX_S:
            reasons.append(f"leader silent for {heard:.1f} s")
    if health.timing_out:
        reasons.append("the last commit timed out (probing)")
    if health.oldest_inflight_s is not None and health.oldest_inflight_s > STALLED_COMMIT_S:
        reasons.append(f"a commit has waited {health.oldest_inflight_s:.1f} s")
    up, configured = smtp_workers
    if configured and not up:
        reasons.append(f"no SMTP worker accepting connections yet (0 of {configured})")
    return Readiness(not reasons, tuple(reasons))
