"""Replacing a failed node (docs/maintenance.md): same address, empty data dir.

The runbook's claim: a node started at a member's address with a wiped data
dir joins as a follower and catches up from the leader's snapshot and log,
and is then a full member (it carries the data a majority needs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cluster import FAST_TUNING, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Small compaction threshold: by the time the node returns the leader has compacted,
# so the node must take a snapshot, not just the log.
TUNING = (*FAST_TUNING, "--log-compaction-min-entries", "20")


def _offer_ok(c: Cluster, i: int, acked: dict[str, str]) -> None:
    offer_ok(c, i, acked)


def test_node_with_a_wiped_data_dir_resyncs_from_its_peers(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=TUNING) as c:
        acked: dict[str, str] = {}
        lead = c.wait_for_leader()
        for k in range(6):
            _offer_ok(c, k % 3, acked)
        victim = next(i for i in c.live_indexes() if i != lead)
        c.kill(victim)
        survivors = c.live_indexes()
        for k in range(40):
            _offer_ok(c, survivors[k % 2], acked)
        c.wait_applied_equal()  # the runbook's precondition: survivors caught up

        shutil.rmtree(c.nodes[victim].data_dir)  # the disk was replaced
        c.start_node(victim)
        c.wait_for_leader()
        c.wait_applied_equal(timeout_s=30)
        assert "installed snapshot" in c.nodes[victim].log_path.read_text(), (
            "the replaced node did not take a snapshot"
        )
        assert c.queue_ids(victim) == sorted(acked.values())

        # A full member: with another survivor gone, the replaced node is half of the
        # majority, and everything acknowledged is still there and mail is accepted.
        other = next(i for i in survivors if i != c.wait_for_leader())
        c.kill(other)
        c.wait_for_leader(timeout_s=30)
        for _ in range(3):
            _offer_ok(c, victim, acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)
        assert c.queue_ids(victim) == sorted(acked.values())
