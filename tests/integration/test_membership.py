"""`mqnode cluster add-node` / `remove-node` against real nodes (docs/maintenance.md, section 4).

What these show:
* a node started with `--join` and added on the leader receives every queue
  entry and accepts mail;
* the member list survives kill -9 of every node: each node restarts with the
  command line it was first given (the original three still have `--peers`
  without the fourth), and the list stored in its data dir wins;
* after remove-node the quorum is the new one: 2 of the remaining 3 commit
  (2 of the old 4 could not);
* refusals are one line on stderr, exit code 2 for a malformed address and 1
  for the rest; a second change while one is pending is refused, and a
  pending change that a new leader never saw is undone on the old leader.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cli import run_cli
from tests.support.cluster import ADMIN_TOKEN, FAST_TUNING, HOST, Cluster, http_get_json

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _offer_ok(c: Cluster, i: int, acked: dict[str, str]) -> None:
    offer_ok(c, i, acked, size=512)


def _cluster_cli(c: Cluster, admin_of: int, *args: str) -> subprocess.CompletedProcess[str]:
    token = ["--admin-token-file", str(c.admin_token_file)]
    return run_cli("cluster", *args, "--admin", c.nodes[admin_of].admin_addr, *token)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, f"expected a one-line error, got:\n{proc.stderr}"
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _raft_port_open(c: Cluster, i: int) -> None:
    def probe() -> tuple[bool | None, str]:
        with socket.socket() as s:
            s.settimeout(1.0)
            ok = s.connect_ex((HOST, c.nodes[i].raft_port)) == 0
        return (True if ok else None), "raft port closed"

    c.poll(f"{c.nodes[i].node_id}'s raft port", probe, 20, [i])


def _wait_members(c: Cluster, nodes: list[int], members: list[int]) -> None:
    """Every node in `nodes` reports exactly `members` and the matching quorum."""
    want = sorted(c.nodes[m].raft_addr for m in members)

    def probe() -> tuple[bool | None, str]:
        seen = {}
        for i in nodes:
            st = c.try_get(i, "/status")
            seen[c.nodes[i].node_id] = None if st is None else (st["members"], st["quorum"])
        ok = all(v == (want, len(want) // 2 + 1) for v in seen.values())
        return (True if ok else None), f"(members, quorum): {seen}"

    c.poll(f"members {want} on {[c.nodes[i].node_id for i in nodes]}", probe, 20)


def _kill_all_and_restart(c: Cluster, nodes: list[int]) -> None:
    for i in nodes:
        c.kill(i)
    for i in nodes:
        c.spawn(i)  # the command line each node was first given
    c.wait_admin_up(nodes, 30)


# Compaction every 20 entries: the added node starts from the leader's snapshot (and
# its member list), not from the whole log.
GROW_TUNING = (*FAST_TUNING, "--log-compaction-min-entries", "20")


def test_grow_to_four_restart_shrink_to_three_restart(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=GROW_TUNING) as c:
        acked: dict[str, str] = {}
        lead = c.wait_for_leader()
        for k in range(30):
            _offer_ok(c, k % 3, acked)

        # --- 3 -> 4 -------------------------------------------------------------------
        new = c.add_node()  # --peers: the three members; --join
        c.start_node(new)
        _raft_port_open(c, new)
        st = c.status(new)
        assert (st["role"], st["term"], st["leader_raft_addr"]) == ("follower", 0, None), st
        lead = c.wait_for_leader(among=[0, 1, 2])
        proc = _cluster_cli(c, lead, "add-node", c.nodes[new].raft_addr)
        assert proc.returncode == 0, proc.stderr
        assert "added" in proc.stdout and "4 members, quorum 3" in proc.stdout, proc.stdout
        c.wait_for_leader()  # now the new node names the leader as well
        _wait_members(c, [0, 1, 2, new], [0, 1, 2, new])
        for k in range(8):
            _offer_ok(c, k % 4, acked)  # the new node accepts mail too
        c.wait_applied_equal()
        assert c.queue_ids(new) == sorted(acked.values())
        assert "installed snapshot" in c.nodes[new].log_path.read_text(errors="replace")

        # --- kill -9 all four; the first three restart with --peers lacking the fourth --
        _kill_all_and_restart(c, [0, 1, 2, new])
        c.wait_for_leader(30)
        _wait_members(c, [0, 1, 2, new], [0, 1, 2, new])
        log = c.nodes[0].log_path.read_text(errors="replace")
        assert "overrides --peers" in log and c.nodes[new].raft_addr in log, c.nodes[0].log_tail()
        for k in range(4):
            _offer_ok(c, k % 4, acked)
        c.wait_applied_equal()
        assert c.queue_ids(new) == sorted(acked.values()), "the added node missed entries"

        # --- 4 -> 3: remove a follower of the original three, then stop it -------------
        lead = c.wait_for_leader()
        gone = next(i for i in (0, 1, 2) if i != lead)
        proc = _cluster_cli(c, lead, "remove-node", c.nodes[gone].raft_addr)
        assert proc.returncode == 0, proc.stderr
        assert "removed" in proc.stdout and "3 members, quorum 2" in proc.stdout, proc.stdout
        c.stop_node(gone)
        rest = [i for i in (0, 1, 2, new) if i != gone]
        _wait_members(c, rest, rest)
        # The new quorum: with one more follower down, 2 of 3 commit (2 of 4 would not).
        down = next(i for i in rest if i not in (lead, new))
        c.kill(down)
        alive = [i for i in rest if i != down]
        for k in range(4):
            _offer_ok(c, alive[k % 2], acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked, alive)

        # --- kill -9 the rest and restart the three members (n1-n3 still list the gone one)
        for i in alive:
            c.kill(i)
        for i in rest:
            c.spawn(i)
        c.wait_admin_up(rest, 30)
        c.wait_for_leader(30)
        _wait_members(c, rest, rest)
        for k in range(3):
            _offer_ok(c, rest[k], acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)
        st = c.status(rest[0])
        assert c.nodes[gone].raft_addr not in st["match_index"], st


TUNING = (*FAST_TUNING, "--fault-injection", "--leader-fallback-ms", "10000")


def _partition(c: Cluster, i: int, blocked: list[int]) -> None:
    """Fault injection: node i drops all Raft traffic with `blocked`."""
    body = json.dumps({"block": [c.nodes[b].raft_addr for b in blocked]}).encode()
    req = urllib.request.Request(
        c.nodes[i].admin_url + "/fault/partition",
        data=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def test_refused_membership_changes(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=TUNING) as c:
        lead = c.wait_for_leader()
        follower = next(i for i in (0, 1, 2) if i != lead)
        other = next(i for i in (0, 1, 2) if i not in (lead, follower))
        new = c.add_node()
        c.start_node(new)
        _raft_port_open(c, new)
        addr = c.nodes[new].raft_addr

        # Malformed addresses: bad flags, exit 2, refused before any request.
        for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "host name:7001", "a:b"):
            _one_line_error(_cluster_cli(c, lead, "add-node", bad), 2, "add-node")
        # Asked of a follower: says which node leads and where to ask.
        line = _one_line_error(_cluster_cli(c, follower, "add-node", addr), 1, "not the leader")
        assert c.nodes[lead].node_id in line and c.nodes[lead].admin_addr in line, line
        # Against the rules.
        member = c.nodes[follower].raft_addr
        _one_line_error(_cluster_cli(c, lead, "add-node", member), 1, "already a member")
        _one_line_error(_cluster_cli(c, lead, "remove-node", addr), 1, "not a member")
        leader_addr = c.nodes[lead].raft_addr
        _one_line_error(_cluster_cli(c, lead, "remove-node", leader_addr), 1, "is the leader")
        c.stop_node(new)  # now nothing listens at its raft address
        _one_line_error(_cluster_cli(c, lead, "add-node", addr), 1, "nothing accepts")
        c.start_node(new)
        _raft_port_open(c, new)

        # One change at a time. Cut the leader off from both followers: it stays leader
        # (leader_fallback_ms is long here) but cannot commit, so its add stays pending.
        _partition(c, lead, [follower, other])
        proc = _cluster_cli(c, lead, "add-node", addr, "--timeout-s", "1")
        _one_line_error(proc, 1, "not committed within 1s")
        proc = _cluster_cli(c, lead, "remove-node", c.nodes[other].raft_addr)
        _one_line_error(proc, 1, "another membership change is pending", f"add {addr}")
        # The two followers elect a leader of their own, whose log lacks the add.
        c.wait_for_leader(among=[follower, other])
        _partition(c, lead, [])
        # The old leader rejoins as a follower; its uncommitted add is undone.
        c.wait_for_leader(among=[0, 1, 2])
        _wait_members(c, [0, 1, 2], [0, 1, 2])
        new_lead = c.wait_for_leader(among=[0, 1, 2])
        st = http_get_json(c.nodes[new_lead].admin_url + "/status")
        assert addr not in st["match_index"], st


def test_a_joining_node_takes_the_member_list_from_the_entry_that_adds_it(tmp_path: Path) -> None:
    # No compaction yet: the new node gets the whole log, not a snapshot (whose member
    # list would replace its own anyway), so only the add entry can correct it.
    with Cluster(tmp_path, extra_args=FAST_TUNING) as c:
        lead = c.wait_for_leader()
        new = c.add_node(peers=[lead])  # an incomplete --peers: only the leader
        c.start_node(new)
        _raft_port_open(c, new)
        proc = _cluster_cli(c, lead, "add-node", c.nodes[new].raft_addr)
        assert proc.returncode == 0, proc.stderr
        _wait_members(c, [0, 1, 2, new], [0, 1, 2, new])
        log = c.nodes[new].log_path.read_text(errors="replace")
        assert "is not the cluster's" in log, c.nodes[new].log_tail()
        acked: dict[str, str] = {}
        _offer_ok(c, new, acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)
