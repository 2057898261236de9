"""readiness.assess: ready only when a submission here would commit now."""

from __future__ import annotations

from mqnode.admin.readiness import assess
from mqnode.raft import RaftStatus
from mqnode.raft.commit_pipeline import PipelineHealth

HEALTHY = PipelineHealth(
    last_commit_s=10.0, last_timeout_s=None, expired_entries=0, oldest_inflight_s=None
)


def _status(
    role: str = "follower",
    leader: str | None = "127.0.0.1:7001",
    quorum: bool = True,
    heard: float | None = 0.05,
) -> RaftStatus:
    return RaftStatus(role, leader, 3, 100, 100, quorum, 10, leader_heard_s=heard)


def test_a_follower_hearing_its_leader_with_commits_working_is_ready() -> None:
    r = assess(_status(), HEALTHY)
    assert r.ready and r.reasons == ()
    assert assess(_status(role="leader", heard=None), HEALTHY).ready


def test_knowing_a_leader_is_not_enough() -> None:
    assert not assess(_status(leader=None), HEALTHY).ready
    assert not assess(_status(quorum=False), HEALTHY).ready
    silent = assess(_status(heard=5.0), HEALTHY)
    assert not silent.ready and "leader silent" in silent.reasons[0]
    assert not assess(_status(heard=None), HEALTHY).ready  # the link to it closed


def test_a_node_with_smtp_workers_is_ready_once_one_accepts() -> None:
    starting = assess(_status(), HEALTHY, smtp_workers=(0, 2))
    assert not starting.ready and "no SMTP worker accepting" in starting.reasons[0]
    assert assess(_status(), HEALTHY, smtp_workers=(1, 2)).ready  # one serves; one restarts
    assert assess(_status(), HEALTHY, smtp_workers=(0, 0)).ready  # sessions in the node


def test_commits_timing_out_make_a_node_unready_until_one_commits() -> None:
    timing_out = PipelineHealth(10.0, 12.0, 3, None)
    r = assess(_status(), timing_out)
    assert not r.ready and "timed out" in r.reasons[0]
    assert assess(_status(), PipelineHealth(13.0, 12.0, 3, None)).ready
    stuck = assess(_status(role="leader", heard=None), PipelineHealth(10.0, None, 0, 4.0))
    assert not stuck.ready and "waited" in stuck.reasons[0]


def test_a_leader_needs_a_majority_heard_lately() -> None:
    def leader(heard: dict[str, float | None]) -> RaftStatus:
        members = ("a:1", *heard)
        return RaftStatus(
            "leader", "a:1", 3, 9, 9, True, 10, members=members, peer_last_heard_s=heard
        )

    assert assess(leader({"b:1": 0.1, "c:1": 9.0}), HEALTHY).ready
    alone = assess(leader({"b:1": 5.0, "c:1": None}), HEALTHY)
    assert not alone.ready and "no majority" in alone.reasons[0]
