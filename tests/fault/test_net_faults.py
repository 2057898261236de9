"""Real network faults between namespaced nodes: safety and liveness after every heal.

Each node runs in its own network namespace (tests/support/netlab.py); faults
come from the kernel (links down, iptables drops one or both ways, packet loss,
a user-space delay), never from an in-process hook. For each seeded scenario
the checker (tests/support/netfaults.py) demands: nothing acknowledged lost,
no 250 from a node cut off from every majority, duplicates within the
delivery window per leader change, nothing resurrected, every node answering
250 within a bound after the final heal, the queue drained, and /readyz 200
from every node after the heal. The long random schedule is
`python -m bench.netchaos` (docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import netlab
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.netfaults import (
    NetReport,
    NetScript,
    cut_during_catch_up,
    cut_during_membership_change,
    cut_follower_from_leader,
    cut_followers_from_each_other,
    flapping,
    isolate_leader,
    kill_during_heal,
    lossy_slow,
    one_way,
    partition_during_transfer,
    run_net_scenario,
)
from tests.support.netlab import NetLab

_WHY_NOT = netlab.available()
pytestmark = [
    pytest.mark.fault,
    pytest.mark.timeout(300),
    pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or ""),
]

SEED = 20261206
# Snapshots every 150 entries: a node away for seconds under load catches up from one.
COMPACTING = (*FAST_TUNING, "--log-compaction-min-entries", "150")
RELAY = "127.0.0.1:2600"  # each node's own sink, inside its namespace


def _run(
    tmp_path: Path, name: str, script: NetScript, load_s: float, seed: int = SEED, hosts: int = 3
) -> NetReport:
    with NetLab(hosts, tmp_path) as lab:
        lab.start_sinks()
        with Cluster(tmp_path, extra_args=COMPACTING, relay_host=RELAY, netlab=lab) as c:
            report = run_net_scenario(name, lab, c, script, seed, load_s)
    _assert_live(report)
    return report


def _assert_live(report: NetReport) -> None:
    print(f"\n{report.as_dict()}")
    assert report.ok(), f"{report.scenario}: {report.problems()}\n{report.as_dict()}"


@pytest.mark.parametrize("away_s", [3.0, 10.0])
def test_isolated_leader_heals_and_every_node_accepts(tmp_path: Path, away_s: float) -> None:
    """The leader alone under load, briefly and for long; the long isolation leaves it so far
    behind the compacted log that it must catch up from a snapshot."""
    script = isolate_leader(1.5, away_s)
    report = _run(tmp_path, f"isolate-leader-{away_s:g}s", script, away_s + 4, SEED + int(away_s))
    if away_s >= 10:
        assert report.snapshot_installs >= 1, "the healed node never installed a snapshot"


def test_follower_cut_from_the_leader_only_heals_with_the_same_leader(tmp_path: Path) -> None:
    _run(tmp_path, "cut-follower-from-leader", cut_follower_from_leader(1.5, 6.0), 10)


def test_followers_cut_from_each_other(tmp_path: Path) -> None:
    _run(tmp_path, "cut-followers", cut_followers_from_each_other(1.5, 6.0), 10)


@pytest.mark.parametrize("from_leader", [True, False])
def test_one_way_partition(tmp_path: Path, from_leader: bool) -> None:
    name = "one-way-from-leader" if from_leader else "one-way-to-leader"
    _run(tmp_path, name, one_way(1.5, 5.0, from_leader), 9)


def test_flapping_links(tmp_path: Path) -> None:
    _run(tmp_path, "flapping", flapping(1.0, 12.0), 14)


def test_slow_lossy_links(tmp_path: Path) -> None:
    """50 ms round trips with jitter and 1% loss on every Raft link."""
    _run(tmp_path, "rtt50-loss1", lossy_slow(1.0, 10.0, 50.0, 0.01), 12)


def test_kill_minus_nine_during_the_heal(tmp_path: Path) -> None:
    _run(tmp_path, "kill-during-heal", kill_during_heal(1.5, 6.0), 10)


def test_partition_during_a_leadership_transfer(tmp_path: Path) -> None:
    _run(tmp_path, "cut-during-transfer", partition_during_transfer(1.5, 6.0), 10)


def test_cut_again_while_catching_up_from_a_snapshot(tmp_path: Path) -> None:
    _run(tmp_path, "cut-during-catch-up", cut_during_catch_up(1.5, 7.0, 2.0), 12)


def test_partition_during_a_membership_change(tmp_path: Path) -> None:
    """A fourth node added while the leader is cut from a follower: after the heal all
    four accept mail."""
    _run(tmp_path, "cut-during-add-node", cut_during_membership_change(1.5, 5.0), 10, hosts=4)
