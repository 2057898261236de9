"""`mqnode cluster status` and `mqnode cluster transfer-leadership` against real nodes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.cluster import FAST_TUNING, HOST, Cluster
from tests.support.smtp import make_message, submit

pytestmark = pytest.mark.integration


def test_cluster_status_and_leadership_transfer(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=FAST_TUNING) as c:
        token = ["--admin-token-file", str(c.admin_token_file)]
        follower = c.followers()[0]

        deadline = time.monotonic() + 20
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:  # every node announces itself once it sees a leader
            proc = run_cli("cluster", "status", "--json", "--admin", c.nodes[follower].admin_addr)
            assert proc.returncode == 0, proc.stderr
            rows = json.loads(proc.stdout)
            if len(rows) == 3:
                break
            time.sleep(0.2)
        assert sorted(str(r["node"]) for r in rows) == ["n1", "n2", "n3"], rows
        assert [r["role"] for r in rows].count("leader") == 1

        old = c.leader()
        target = c.nodes[follower].raft_addr
        # Mail arriving meanwhile keeps the log growing, so the target is often a few
        # entries behind at the instant the leader looks: the handover must still happen.
        stop = threading.Event()

        def keep_submitting() -> None:
            for _ in range(300):
                if stop.is_set():
                    return
                msg = make_message(1024)
                submit(HOST, c.nodes[old].smtp_port, "a@client.test", ["r@example.test"], msg.data)

        feeder = threading.Thread(target=keep_submitting, daemon=True)
        feeder.start()
        try:
            time.sleep(0.3)
            proc = run_cli(
                "cluster",
                "transfer-leadership",
                "--to",
                target,
                "--admin",
                c.nodes[follower].admin_addr,
                *token,
            )
        finally:
            stop.set()
            feeder.join(timeout=60)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if c.status(follower)["role"] == "leader":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"leadership did not move from n{old + 1} to {target}")
        assert c.wait_for_leader() == follower
        text = run_cli("cluster", "status", "--admin", c.nodes[old].admin_addr).stdout
        assert "leader" in text and "n1" in text
