"""bench --baseline-tree: an older checkout measured in the paired rounds."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from bench import paired
from bench.plan import QUICK, Baseline, BaselineCluster

ROOT = Path(__file__).resolve().parents[2]


def test_this_checkout_is_a_baseline_with_its_commit_and_flags() -> None:
    b = Baseline.at(ROOT)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert b.commit == head
    assert b.negated_flags


def test_a_directory_without_mqnode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no mqnode checkout"):
        Baseline.at(tmp_path)


def test_its_nodes_import_its_code_and_get_flags_it_reads(tmp_path: Path) -> None:
    old = Baseline(tmp_path / "old", "abc1234", negated_flags=False)
    c = BaselineCluster(tmp_path / "run", old, n=3)
    cmd = c.command(0)
    assert cmd[:2] == ["env", f"PYTHONPATH={tmp_path / 'old'}"]
    at = cmd.index("--delivery-enabled")
    assert cmd[at + 1] == "0" and "--no-delivery-enabled" not in cmd
    new = BaselineCluster(tmp_path / "run2", dataclasses.replace(old, negated_flags=True), n=3)
    assert "--no-delivery-enabled" in new.command(0)


def test_the_paired_workloads_get_its_rows() -> None:
    assert paired.systems(QUICK) == paired.SYSTEMS
    plan = dataclasses.replace(QUICK, baseline=Baseline(Path("/x"), "abc1234", True))
    assert paired.systems(plan)[-1] == "mqnode abc1234, 3 nodes, 2 smtp workers, to leader"
    assert paired.e2e_systems(plan)[-1].startswith("mqnode abc1234,")
