"""Security boundaries on real nodes: the Raft transport's cluster secret, the admin token.

* A process that holds a member's exact flags and data dir but not the cluster
  secret learns nothing from the cluster and changes nothing in it; the real
  member rejoins afterwards.
* The admin API answers 401 on every queue and Raft endpoint without the
  right bearer token, and serves /status, /metrics, /healthz and /readyz
  without one.

Starting without a secret file (exit 2) is covered by test_cluster_basic.py
(`test_bad_flags_exit_2_with_one_line[no secret flag]`, `test_bad_secret_file_exit_2`).
No timing assertions: every wait is a bounded poll; the impostor is watched for
a fixed number of rounds of mail that the rest of the cluster commits meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cluster import ADMIN_TOKEN, Cluster, http_get_json, http_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SENDER = "sender@client.test"
RCPT = "rcpt@example.test"
WRONG_SECRET = "not-the-cluster-secret-but-long-enough-0123456789"
# Watch the impostor for at least WATCH_S while the real members commit mail, in bounded
# rounds (one message to each real member, then a look at the impostor's /status).
WATCH_S = 4.0
MAX_ROUNDS = 200
ROUND_PAUSE_S = 0.2
STOP_GRACE_S = 10.0


def _offer_ok(c: Cluster, i: int, acked: dict[str, str]) -> None:
    offer_ok(c, i, acked, sender=SENDER, rcpts=[RCPT])


class Impostor:
    """Node i's exact command line with another secret file; stopped by PID."""

    def __init__(self, c: Cluster, i: int, secret_file: Path, log_path: Path) -> None:
        cmd = c.command(i)
        cmd[cmd.index("--cluster-secret-file") + 1] = str(secret_file)
        self.admin_url = c.nodes[i].admin_url
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=c.base_dir,
                start_new_session=True,
            )

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = http_get_json(self.admin_url + "/status", 2.0)
        except (OSError, ValueError):
            return None
        return doc

    def wait_up(self, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"impostor exited early:\n{self.log_tail()}"
            st = self.status()
            if st is not None:
                return st
            time.sleep(0.1)
        raise AssertionError(f"impostor's admin endpoint never answered:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc.poll() is not None:
            return self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=STOP_GRACE_S)


def test_member_without_the_cluster_secret_learns_nothing_and_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    victim = 2  # n3
    acked: dict[str, str] = {}
    c.wait_for_leader()
    for i in range(3):
        _offer_ok(c, i, acked)
    applied_at_stop = c.wait_applied_equal()
    ids_at_stop = c.queue_ids(victim)
    c.stop_node(victim)
    others = [i for i in range(3) if i != victim]
    c.wait_for_leader()

    secret = tmp_path / "wrong.secret"
    secret.write_text(WRONG_SECRET + "\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    impostor = Impostor(c, victim, secret, tmp_path / "impostor.log")
    try:
        impostor.wait_up()
        seen: list[dict[str, Any]] = []
        watch_until = time.monotonic() + WATCH_S
        for _ in range(MAX_ROUNDS):
            if time.monotonic() >= watch_until:
                break
            time.sleep(ROUND_PAUSE_S)
            for i in others:  # the two real members still form a majority and commit
                _offer_ok(c, i, acked)
            st = impostor.status()
            assert impostor.proc.poll() is None, f"impostor died:\n{impostor.log_tail()}"
            if st is None:
                continue
            seen.append(st)
            assert st["role"] != "leader" and not st["has_quorum"], st
            assert st["leader_id"] is None and st["leader_raft_addr"] is None, st
            assert st["last_applied"] <= applied_at_stop, (st, applied_at_stop)
            assert st["commit_index"] <= applied_at_stop, (st, applied_at_stop)
        assert seen, f"the impostor never answered /status:\n{impostor.log_tail()}"
        # pysyncobj drops such connections silently; the real members say why (and
        # so does the impostor: "do not decrypt" is logged by whichever side receives).
        c.poll(
            "a wrong-secret warning in a real member's log",
            lambda: (
                True if any(_secret_warning(c.nodes[i].log_tail(400)) for i in others) else None,
                "no warning yet",
            ),
            timeout_s=10,
            watch=others,
        )
        assert sorted(m["id"] for m in _queue(impostor.admin_url)) == ids_at_stop

        applied_now = c.wait_applied_equal()
        assert applied_now > applied_at_stop
        assert all(st["commit_index"] < applied_now for st in seen)
        for i in others:  # the cluster holds exactly the acknowledged mail, nothing else
            assert c.queue_ids(i) == sorted(acked.values()), c.nodes[i].node_id
    finally:
        rc = impostor.stop()
    assert rc == 0, f"impostor exit code {rc}:\n{impostor.log_tail()}"

    c.start_node(victim)  # the real n3, right secret, same data dir: catches up
    c.wait_for_leader(timeout_s=30)
    c.wait_applied_equal(timeout_s=30)
    assert_acked_once(c, acked)
    for i in range(3):
        assert c.queue_ids(i) == sorted(acked.values()), c.nodes[i].node_id
    _offer_ok(c, victim, acked)  # and it takes mail again
    c.wait_applied_equal()
    assert_acked_once(c, acked)


def _secret_warning(log: str) -> bool:
    """One of our two wrong-secret lines (which one depends on which side connects)."""
    return "do not decrypt" in log or "without answering the key exchange" in log


def _queue(admin_url: str) -> list[dict[str, Any]]:
    doc = http_get_json(admin_url + "/queue?limit=100000", 5.0)
    messages: list[dict[str, Any]] = doc["messages"]
    return messages


# --- admin API authentication -------------------------------------------------------------


def _request(
    port: int, method: str, path: str, auth: str | None, body: bytes | None = None
) -> tuple[int, bytes]:
    return http_request(port, method, path, auth, body)


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """A cluster with one queued message (its id is the second item)."""
    with Cluster(tmp_path_factory.mktemp("auth")) as c:
        acked: dict[str, str] = {}
        _offer_ok(c, c.wait_for_leader(), acked)
        c.wait_applied_equal()
        yield c, next(iter(acked.values()))


BAD_AUTH = {
    "none": None,
    "empty": "",
    "bare bearer": "Bearer ",
    "wrong token": "Bearer wrong-token-0123456789abcdef",
    "token without scheme": ADMIN_TOKEN,
    "basic scheme": f"Basic {ADMIN_TOKEN}",
    "token prefix": f"Bearer {ADMIN_TOKEN[:-1]}",
    "token plus suffix": f"Bearer {ADMIN_TOKEN}x",
}

PROTECTED: list[tuple[str, str, bytes | None]] = [
    ("GET", "/queue", None),
    ("GET", "/queue?state=active&limit=5", None),
    ("GET", "/queue/{id}", None),
    ("GET", "/queue/{id}/body", None),
    ("POST", "/queue/hold", b'{"ids": ["{id}"]}'),
    ("POST", "/queue/delete", b'{"ids": ["{id}"]}'),
    ("POST", "/queue/delete", b"{}"),  # "everything", were it allowed
    ("POST", "/queue/retry", b'{"state": "active"}'),
    ("POST", "/raft/compact", b"{}"),
    ("POST", "/raft/transfer-leadership", b"{}"),
    ("POST", "/raft/add-node", b'{"addr": "127.0.0.1:1"}'),
    ("POST", "/raft/remove-node", b'{"addr": "127.0.0.1:1"}'),
    ("GET", "/%71ueue", None),  # percent-encoded: still /queue to the router
    ("GET", "/raft/../queue", None),
]


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
def test_queue_and_raft_endpoints_answer_401_without_the_token(
    auth_cluster: tuple[Cluster, str], auth: str | None
) -> None:
    c, qid = auth_cluster
    for i, node in enumerate(c.nodes):
        for method, path, body in PROTECTED:
            path = path.replace("{id}", qid)
            data = None if body is None else body.replace(b"{id}", qid.encode())
            status, text = _request(node.admin_port, method, path, auth, data)
            assert status == 401, (node.node_id, method, path, auth, status, text[:200])
            missing = auth is None or auth.strip() in ("", "Bearer")
            said = b"admin token required" if missing else b"admin token refused: wrong token"
            assert said in text, text[:200]
            assert qid.encode() not in text
        # nothing was changed: the message is still there, active, not held
        entry = c.queue_entry(i, qid)
        assert entry is not None and entry["state"] == "active", entry


def test_open_endpoints_answer_without_a_token(auth_cluster: tuple[Cluster, str]) -> None:
    c, qid = auth_cluster
    c.wait_for_leader()
    for node in c.nodes:
        for path in ("/status", "/metrics", "/healthz", "/readyz"):
            status, text = _request(node.admin_port, "GET", path, None)
            assert status == 200, (node.node_id, path, status, text[:200])
            assert qid.encode() not in text, f"{path} shows a queue id without a token"
        status, _ = _request(node.admin_port, "GET", "/queue", f"Bearer {ADMIN_TOKEN}")
        assert status == 200  # and the right token does open the queue
