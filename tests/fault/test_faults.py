"""Fault suite (short, seeded): kill -9, SIGSTOP, partitions, full restarts, disk full.

Each scenario runs load over SMTP against all three nodes while a fault
script breaks things, then brings every node back and checks the promise:
no acknowledged message lost, no Message-ID queued twice, every node's queue
identical. `bench/chaos.py` runs the long versions and writes docs/reliability.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.chaos import (
    Report,
    acked_in_window,
    full_restart,
    kill_follower,
    kill_leader_repeatedly,
    kill_two,
    partition_leader,
    pause_leader,
    run_scenario,
)
from tests.support.cluster import FAST_TUNING, Cluster

pytestmark = pytest.mark.fault

SEED = 20261123
# Compaction active: snapshots every 150 entries, so restarts cross snapshot + log.
COMPACTING = (*FAST_TUNING, "--log-compaction-min-entries", "150", "--fault-injection", "1")


def _assert_promise(report: Report) -> None:
    print(f"\n{report.as_dict()}")
    assert report.acknowledged > 0, f"no message was acknowledged at all: {report}"
    assert report.ok(), f"promise broken: {report.as_dict()}"


def test_kill_leader_under_load(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, _, _ = run_scenario(
            "kill-leader", c, kill_leader_repeatedly(2, 2.0, 1.0), SEED, load_s=9
        )
    _assert_promise(report)
    assert report.failover_s is not None


def test_kill_follower_under_load(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, _, _ = run_scenario("kill-follower", c, kill_follower(1.5, 3.0), SEED, load_s=7)
    _assert_promise(report)


def test_kill_two_of_three_never_acks(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, result, ctx = run_scenario("kill-two", c, kill_two(1.5, 4.0), SEED, load_s=9)
    _assert_promise(report)
    # Anything submitted after both kills and answered before the restart had no majority.
    bad = acked_in_window(result, ctx.marks["fault"] + 0.05, ctx.marks["heal"])
    assert bad == [], f"250 given without a majority: {bad[:5]}"


@pytest.mark.parametrize("pause_factor", [0.5, 10])
def test_pause_leader(tmp_path: Path, pause_factor: float) -> None:
    election_s = 0.6
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, _, _ = run_scenario(
            f"pause-leader-{pause_factor}x",
            c,
            pause_leader(1.5, pause_factor * election_s),
            SEED,
            load_s=1.5 + pause_factor * election_s + 3,
        )
    _assert_promise(report)


@pytest.mark.parametrize("staggered", [False, True])
def test_full_cluster_kill_and_restart(tmp_path: Path, staggered: bool) -> None:
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, _, _ = run_scenario(
            f"full-restart-{'staggered' if staggered else 'together'}",
            c,
            full_restart(rounds=3, every_s=2.0, staggered=staggered),
            SEED,
            load_s=12,
        )
    _assert_promise(report)


def test_partition_leader_and_heal(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        report, _, _ = run_scenario(
            "partition-leader", c, partition_leader(1.5, 4.0), SEED, load_s=8
        )
    _assert_promise(report)


def test_follower_catches_up_from_snapshot(tmp_path: Path) -> None:
    """A node down while the others compacted comes back via snapshot + log."""
    with Cluster(tmp_path, extra_args=COMPACTING) as c:
        victim = c.followers()[0]
        c.kill(victim)
        report, _, _ = run_scenario("catch-up", c, lambda ctx: time.sleep(4.0), SEED, load_s=4)
        log = c.nodes[victim].log_path.read_text()
    _assert_promise(report)
    assert "installed snapshot" in log, "the lagging node did not take a snapshot"
