"""`mqnode cluster status` rows: never one node's figures under another's name."""

from __future__ import annotations

from typing import Any

from mqnode.cli.text import cluster_rows

NODES = {
    "10.0.0.1:7001": {"node_id": "n1", "admin_addr": "127.0.0.1:8025"},
    "10.0.0.2:7001": {"node_id": "n2", "admin_addr": "127.0.0.1:8025"},
    "10.0.0.3:7001": {"node_id": "n3", "admin_addr": "10.0.0.3:8025"},
}


def status(raft: str, node: str, role: str, **kw: Any) -> dict[str, Any]:
    base = {
        "raft_addr": raft,
        "node_id": node,
        "role": role,
        "term": 4,
        "commit_index": 100,
        "last_applied": 100,
        "lease_held": role == "leader",
        "match_index": {},
    }
    return {**base, **kw}


def test_a_loopback_admin_reaching_the_local_node_is_not_reported_as_the_peer() -> None:
    n1 = status(
        "10.0.0.1:7001", "n1", "leader", match_index={"10.0.0.2:7001": 90, "10.0.0.3:7001": 100}
    )
    statuses = {
        "10.0.0.1:7001": n1,
        "10.0.0.2:7001": n1,  # 127.0.0.1:8025 on n1's host is n1 itself
        "10.0.0.3:7001": status("10.0.0.3:7001", "n3", "follower"),
    }
    rows, problems = cluster_rows(NODES, statuses)
    by = {r["node"]: r for r in rows}
    assert by["n1"]["role"] == "leader" and by["n1"]["lease"]
    assert by["n2"]["role"] == "unreachable"
    assert by["n2"]["lag"] == "10"  # still known from the leader's match index
    assert by["n3"]["role"] == "follower" and by["n3"]["lag"] == "0"
    assert len(problems) == 1 and "n2" in problems[0] and "answered as n1" in problems[0]


def test_unreachable_nodes_and_no_leader() -> None:
    statuses: dict[str, dict[str, Any] | None] = {a: None for a in NODES}
    rows, problems = cluster_rows(NODES, statuses)
    assert [r["role"] for r in rows] == ["unreachable"] * 3
    assert all(r["lag"] == "" for r in rows) and problems == []


def test_nodes_signing_with_different_dkim_key_sets_are_named() -> None:
    nodes = {
        f"10.0.0.{i}:7001": {"node_id": f"n{i}", "admin_addr": f"10.0.0.{i}:8025"}
        for i in (1, 2, 3)
    }

    def status(i: int, key_set: str) -> dict[str, object]:
        return {
            "raft_addr": f"10.0.0.{i}:7001",
            "node_id": f"n{i}",
            "role": "leader" if i == 1 else "follower",
            "term": 2,
            "commit_index": 10,
            "last_applied": 10,
            "lease_held": i == 1,
            "match_index": {},
            "dkim": {"key_set": key_set},
        }

    same = {a: status(i, "abcd") for i, a in zip((1, 2, 3), nodes, strict=True)}
    rows, problems = cluster_rows(nodes, same)  # type: ignore[arg-type]
    assert [r["dkim"] for r in rows] == ["abcd"] * 3 and problems == []
    mixed = {**same, "10.0.0.3:7001": status(3, "")}
    rows, problems = cluster_rows(nodes, mixed)  # type: ignore[arg-type]
    assert len(problems) == 1 and "n3 none" in problems[0] and "n1 abcd" in problems[0]
