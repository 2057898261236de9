"""Queue control through any node (postqueue/postsuper-like); every change goes through the log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chaos import post_json
from tests.support.cli import run_cli
from tests.support.cluster import FAST_TUNING, Cluster, free_ports
from tests.support.smtp import make_message, submit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deferring_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Relays to a loopback port where nothing listens: every attempt defers."""
    dead = free_ports(1)[0]
    args = (*FAST_TUNING, "--retry-base-s", "3600", "--retry-max-s", "3600")
    with Cluster(
        tmp_path_factory.mktemp("qc"), extra_args=args, relay_host=f"127.0.0.1:{dead}"
    ) as c:
        yield c


def _queue(c: Cluster, i: int, *args: str) -> str:
    token = ["--admin-token-file", str(c.admin_token_file)]
    proc = run_cli("queue", *args, "--admin", c.nodes[i].admin_addr, *token)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _states(c: Cluster, qids: list[str]) -> dict[int, dict[str, str | None]]:
    out: dict[int, dict[str, str | None]] = {}
    for i in c.live_indexes():
        entries = {q: c.queue_entry(i, q) for q in qids}
        out[i] = {q: (e["state"] if e else None) for q, e in entries.items()}
    return out


def _wait_states(c: Cluster, qids: list[str], want: str | None, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    seen: dict[int, dict[str, str | None]] = {}
    while time.monotonic() < deadline:
        c.wait_applied_equal(20)
        seen = _states(c, qids)
        if all(s == want for node in seen.values() for s in node.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"wanted {want} everywhere, saw {seen}")


def _submit(c: Cluster, n: int, domain: str) -> list[str]:
    ids = []
    for k in range(n):
        msg = make_message(512, rcpt=f"user{k}@{domain}")
        code, text, qid = submit(
            "127.0.0.1", c.nodes[k % 3].smtp_port, "a@client.test", [f"user{k}@{domain}"], msg.data
        )
        assert code == 250, (code, text)
        ids.append(str(qid))
    return ids


def test_hold_release_delete_retry_apply_on_every_node(deferring_cluster: Cluster) -> None:
    c = deferring_cluster
    ids = _submit(c, 4, "hold.test")
    _wait_states(c, ids, "deferred")  # the relay refuses: every attempt defers

    follower = c.followers()[0]
    out = _queue(c, follower, "hold", ids[0], ids[1])
    assert "hold: 2 message(s)" in out
    _wait_states(c, ids[:2], "hold")

    listing = json.loads(_queue(c, c.leader(), "list", "--state", "hold", "--json"))
    assert sorted(m["id"] for m in listing) == sorted(ids[:2])

    _queue(c, c.leader(), "release", ids[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        entry = c.queue_entry(follower, ids[0])
        if entry and entry["state"] != "hold":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("release did not take effect")

    _queue(c, follower, "delete", ids[1])
    _wait_states(c, [ids[1]], None)

    before = c.queue_entry(0, ids[2])
    assert before is not None
    _queue(c, 0, "retry", ids[2])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = c.queue_entry(0, ids[2])
        if after and after["attempts"] > before["attempts"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"retry did not trigger an attempt: {before} -> {after}")


def test_flush_by_domain_and_bulk_delete(deferring_cluster: Cluster) -> None:
    c = deferring_cluster
    a = _submit(c, 3, "flush-a.test")
    b = _submit(c, 2, "flush-b.test")
    _wait_states(c, a + b, "deferred")
    out = _queue(c, 1, "flush", "--domain", "flush-a.test")
    assert "retry: 3 message(s)" in out, out
    out = _queue(c, 2, "delete", "--all", "--domain", "flush-b.test")
    assert "delete: 2 message(s)" in out
    _wait_states(c, b, None)
    text = _queue(c, 0, "list", "--domain", "flush-a.test")
    assert all(q in text for q in a)


def test_queue_cli_refuses_ambiguous_selection(deferring_cluster: Cluster) -> None:
    c = deferring_cluster
    token = ["--admin-token-file", str(c.admin_token_file)]
    proc = run_cli("queue", "delete", "--admin", c.nodes[0].admin_addr, *token)
    assert proc.returncode == 2 and "--all" in proc.stderr


def test_queue_operations_need_the_admin_token(deferring_cluster: Cluster) -> None:
    c = deferring_cluster
    proc = run_cli("queue", "list", "--admin", c.nodes[0].admin_addr)
    assert proc.returncode == 2 and "admin token required" in proc.stderr
    proc = run_cli(
        "queue",
        "delete",
        "--all",
        "--admin",
        c.nodes[0].admin_addr,
        env={"MQNODE_ADMIN_TOKEN": "x" * 20},
    )
    # A wrong token is named as wrong, not as missing: each node has its own.
    assert proc.returncode == 2 and "wrong token" in proc.stderr, proc.stderr
    assert "each node has its own" in proc.stderr
    good = {"MQNODE_ADMIN_TOKEN": c.admin_token_file.read_text().strip()}
    proc = run_cli("queue", "list", "--admin", c.nodes[0].admin_addr, env=good)
    assert proc.returncode == 0, proc.stderr


def test_bounce_returns_messages_to_their_senders(tmp_path: Path) -> None:
    """`queue bounce` records every pending recipient as bounced and queues a DSN."""
    dead = free_ports(1)[0]
    args = (*FAST_TUNING, "--retry-base-s", "3600", "--retry-max-s", "3600")
    with Cluster(tmp_path, extra_args=args, relay_host=f"127.0.0.1:{dead}") as c:
        ids = _submit(c, 2, "bounce.test")
        _wait_states(c, ids, "deferred")
        out = _queue(c, 2, "bounce", ids[0])
        assert "bounce: 1 message(s)" in out, out
        _wait_states(c, [ids[0]], None)
        msgs = c.queue_messages(0)
        dsns = [m for m in msgs if m["mail_from"] == ""]
        assert len(dsns) == 1 and [r["address"] for r in dsns[0]["recipients"]] == ["a@client.test"]
        body = c.queue_body(0, dsns[0]["id"])
        assert b"report-type=delivery-status" in body and b"returned to sender" in body
        assert c.queue_entry(1, ids[1]) is not None  # the other message is untouched
        # Bounces are those from the null sender: `--sender "<>"` selects them.
        listed = json.loads(_queue(c, 1, "list", "--sender", "<>", "--json"))
        assert [m["id"] for m in listed] == [dsns[0]["id"]], listed
        out = _queue(c, 1, "delete", "--sender", "<>")
        assert "delete: 1 message(s)" in out, out
        _wait_states(c, [dsns[0]["id"]], None)
        assert c.queue_entry(0, ids[1]) is not None


def test_bounce_of_many_returns_each_once(tmp_path: Path) -> None:
    """A selection's bounces commit a window at a time: every message returned, one DSN
    each, even when the request names a message twice."""
    dead = free_ports(1)[0]
    args = (*FAST_TUNING, "--retry-base-s", "3600", "--retry-max-s", "3600")
    with Cluster(tmp_path, extra_args=args, relay_host=f"127.0.0.1:{dead}") as c:
        ids = _submit(c, 70, "many.test")
        _wait_states(c, ids, "deferred", timeout_s=60)
        lead = c.wait_for_leader(20)
        answer = post_json(c, lead, "/queue/bounce", {"ids": [*ids, ids[0], ids[5], "NOPE"]})
        assert answer["count"] == 70, answer
        _wait_states(c, ids, None, timeout_s=60)
        dsns = [m for m in c.queue_messages(lead) if m["mail_from"] == ""]
        assert len(dsns) == 70, len(dsns)


def test_select_by_sender_and_cat_a_message(deferring_cluster: Cluster) -> None:
    """`--sender` selects by envelope sender (any case, with or without <>); `queue cat`
    prints the message as stored (postcat -q), `--headers` its header only (postcat -h)."""
    c = deferring_cluster
    sent: dict[str, tuple[str, bytes]] = {}
    for k, sender in enumerate(["Spam@Flood.test", "spam@flood.test", "ok@client.test"]):
        msg = make_message(600, mail_from=sender, rcpt=f"r{k}@sender.test")
        code, text, qid = submit(
            "127.0.0.1", c.nodes[k % 3].smtp_port, sender, [f"r{k}@sender.test"], msg.data
        )
        assert code == 250, (code, text)
        sent[str(qid)] = (sender, msg.data)
    ids = list(sent)
    _wait_states(c, ids, "deferred")
    listed = json.loads(_queue(c, 0, "list", "--sender", "<SPAM@flood.test>", "--json"))
    assert sorted(m["id"] for m in listed) == sorted(ids[:2]), listed
    out = _queue(c, 2, "hold", "--sender", "spam@flood.test")
    assert "hold: 2 message(s)" in out, out
    _wait_states(c, ids[:2], "hold")
    assert c.queue_entry(0, ids[2])["state"] == "deferred"  # type: ignore[index]

    def cat(*args: str) -> subprocess.CompletedProcess[bytes]:
        token = ["--admin-token-file", str(c.admin_token_file)]
        cmd = [sys.executable, "-m", "mqnode.cli", "queue", "cat", *args]
        return subprocess.run(
            [*cmd, "--admin", c.nodes[1].admin_addr, *token], capture_output=True, timeout=20
        )

    proc = cat(ids[2])
    assert proc.returncode == 0, proc.stderr
    stored = proc.stdout
    assert stored.startswith(b"Received: ") and stored.endswith(sent[ids[2]][1]), stored[:300]
    proc = cat("--headers", ids[2])
    assert proc.returncode == 0, proc.stderr
    header = sent[ids[2]][1].split(b"\r\n\r\n", 1)[0]
    assert proc.stdout.endswith(header + b"\r\n") and b"\r\n\r\n" not in proc.stdout
    proc = cat("NOSUCHID")
    assert proc.returncode == 1 and b"no such message" in proc.stderr, proc.stderr
