"""Disaster recovery: all data dirs lost, one snapshot.bin kept; `mqnode restore` rebuilds.

The runbook's procedure (docs/recovery.md) on real processes:
take a snapshot on a 3-node cluster, stop it for good, restore a new data dir
from the copied file, start that node alone, check it holds exactly the mail
the snapshot covers and takes new mail, then grow it with `cluster add-node`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mqnode.raft import snapshot_file
from tests.support.chaos import post_json
from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cli import run_cli
from tests.support.cluster import ADMIN_TOKEN, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _offer_ok(c: Cluster, i: int, acked: dict[str, str]) -> None:
    offer_ok(c, i, acked, size=2048)


def _snapshot_covering(c: Cluster, i: int, index: int) -> Path:
    path = c.nodes[i].data_dir / "snapshot.bin"

    def probe() -> tuple[Path | None, str]:
        try:
            got = snapshot_file.read_header(path).index
        except Exception as exc:  # not written yet, or being written
            return None, repr(exc)
        return (path if got >= index else None), f"snapshot at {got}"

    return c.poll(f"a snapshot covering index {index}", probe, 20)


def _restore(c: Cluster, backup: Path) -> subprocess.CompletedProcess[str]:
    run_flags = c.command(0)[4:]  # the node's own `run` flags: data dir, raft addr, ...
    return run_cli("restore", "--snapshot", str(backup), *run_flags)


def _audit(c: Cluster, i: int) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        c.nodes[i].admin_url + "/audit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        records: list[dict[str, Any]] = json.loads(resp.read())["records"]
    return records


def test_restore_a_cluster_from_one_snapshot(tmp_path: Path) -> None:
    acked: dict[str, str] = {}
    with Cluster(tmp_path / "old") as old:
        for k in range(12):
            _offer_ok(old, k % 3, acked)
        applied = old.wait_applied_equal()
        lead = old.leader()
        post_json(old, lead, "/raft/compact", {})
        backup = tmp_path / "backup-snapshot.bin"
        shutil.copyfile(_snapshot_covering(old, lead, applied), backup)
    # The old cluster is gone for good: its data dirs are never used again.

    new = Cluster(tmp_path / "new", n=1)
    try:
        proc = _restore(new, backup)
        assert proc.returncode == 0, proc.stderr
        assert "restored" in proc.stdout and "add-node" in proc.stdout, proc.stdout
        again = _restore(new, backup)  # never over an existing state
        assert again.returncode == 2 and "not empty" in again.stderr, again.stderr

        new.start()
        assert new.status(0)["role"] == "leader"
        assert new.queue_ids(0) == sorted(acked.values())
        _offer_ok(new, 0, acked)  # it takes new mail at once

        grown = new.add_node()  # starts empty with --join
        new.start_node(grown)
        token = ["--admin-token-file", str(new.admin_token_file)]
        add = run_cli(
            "cluster",
            "add-node",
            new.nodes[grown].raft_addr,
            "--admin",
            new.nodes[0].admin_addr,
            *token,
        )
        assert add.returncode == 0, add.stderr
        new.wait_for_leader()
        _offer_ok(new, grown, acked)
        new.wait_applied_equal()
        for i in (0, grown):
            assert new.queue_ids(i) == sorted(acked.values()), new.nodes[i].node_id
        assert_acked_once(new, acked)
        # The restore is in the audit trail, on the node added since too.
        records = _audit(new, grown)
        (restored,) = [r for r in records if r["principal"] == "restore"]
        assert restored["action"] == "restore" and str(backup) in restored["target"]
        assert "raft/add-node" in [r["action"] for r in records]
    finally:
        new.stop()


def test_restore_refuses_a_damaged_snapshot(tmp_path: Path) -> None:
    bad = tmp_path / "snapshot.bin"
    bad.write_bytes(b"not a snapshot at all" * 100)
    c = Cluster(tmp_path / "c", n=1)
    proc = _restore(c, bad)
    assert proc.returncode != 0 and proc.stderr.strip(), (proc.returncode, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (c.nodes[0].data_dir / "state").exists() or not any(
        (c.nodes[0].data_dir / "state").iterdir()
    )
