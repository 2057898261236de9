"""A typo in one node's --peers is found and said: in the log, in /status, in cluster status.

Three real nodes; the third is started with a peer list that names an address
nobody listens on instead of the second node. Raft elects a leader and commits
regardless (the first two are a majority), which is why mqnode compares the
lists the members announce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.cluster import Cluster, free_ports

pytestmark = pytest.mark.integration


def test_a_typo_in_one_nodes_peers_shows_in_status_log_and_cluster_status(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path)
    n0, _, n2 = c.nodes
    typo = f"127.0.0.1:{free_ports(1)[0]}"
    n2.extra_args = ["--peers", f"{n0.raft_addr},{typo}"]  # the last --peers wins
    c.start(wait_leader=False)
    try:
        # Whoever leads, some node names the wrong list: the leader when the node with the
        # typo follows it (their announced lists differ), the node with the typo itself
        # when it follows the node it left out (its commands never reach that leader).
        def warned() -> tuple[tuple[int, list[str]] | None, str]:
            seen = {}
            for i in range(3):
                st = c.try_get(i, "/status")
                if st and st.get("member_lists_disagree"):
                    return (i, st["member_lists_disagree"]), ""
                seen[c.nodes[i].node_id] = st and (st["role"], st["leader_raft_addr"])
            return None, str(seen)

        where, said = c.poll("a node's /status to name the wrong list", warned, 60)
        assert any(typo in text and "peers" in text for text in said), said

        def logged() -> tuple[bool | None, str]:
            found = any(
                "member lists disagree" in n.log_path.read_text(errors="replace") for n in c.nodes
            )
            return (True if found else None), "no log line yet"

        c.poll("a node to log it", logged, 30)
        status = run_cli("status", "--admin", c.nodes[where].admin_addr)
        assert "warning" in status.stdout and typo in status.stdout, status.stdout
        proc = run_cli("cluster", "status", "--admin", c.nodes[where].admin_addr)
        assert proc.returncode == 0, proc.stderr
        assert "warning:" in proc.stdout and typo in proc.stdout, proc.stdout
    finally:
        c.stop()


def test_agreeing_lists_say_nothing(tmp_path: Path) -> None:
    with Cluster(tmp_path) as c:
        leader = c.wait_for_leader(30)

        def announced() -> tuple[dict[str, Any] | None, str]:
            nodes = c.status(leader)["nodes"]
            listed = {a: n for a, n in nodes.items() if n.get("members")}
            return (listed if len(listed) == 3 else None), f"lists from {sorted(listed)}"

        nodes = c.poll("every node to announce its member list", announced, 30)
        assert {tuple(n["members"]) for n in nodes.values()} == {
            tuple(sorted(n.raft_addr for n in c.nodes))
        }
        for i in range(3):
            assert c.status(i)["member_lists_disagree"] == []
