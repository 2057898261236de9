"""Issue 2 end to end: real `mqnode run` processes on 127.0.0.1, driven over SMTP.

The promise under test: `250 ... queued as <id>` means the message is one
queue entry, with that id, on every node once it has caught up, and it stays
so through restarts and kill -9. Without a majority no message gets 250.

Clusters run without --relay-host, so nothing is delivered and queue contents
only grow. No timing assertions: every wait is a bounded poll (Cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.checks import assert_acked_once, assert_not_queued
from tests.support.cli import RunCli, flags
from tests.support.cluster import (
    FAST_TUNING,
    TEST_MAX_MESSAGE_BYTES,
    TEST_MAX_RECIPIENTS,
    Cluster,
)
from tests.support.smtp import TestMessage, make_attachment, make_message, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KIB = 1024
MIB = 1024 * KIB
SENDER = "sender@client.test"
RCPT = "rcpt@example.test"
STATUS_FIELDS = {
    "node_id",
    "role",
    "leader_id",
    "leader_raft_addr",
    "term",
    "commit_index",
    "last_applied",
    "queue",
    "lease_held",
    "raft_addr",
    "smtp_addr",
    "admin_addr",
    "has_quorum",
}


def offer(
    c: Cluster, i: int, msg: TestMessage, rcpts: Sequence[str] = (RCPT,), timeout_s: float = 30.0
) -> tuple[int, str, str | None]:
    return submit("127.0.0.1", c.nodes[i].smtp_port, SENDER, list(rcpts), msg.data, timeout_s)


def offer_ok(
    c: Cluster, i: int, msg: TestMessage, rcpts: Sequence[str] = (RCPT,), timeout_s: float = 30.0
) -> str:
    """Submit and insist on 250 with a queue id; the failure message carries the node logs."""
    code, text, qid = offer(c, i, msg, rcpts, timeout_s)
    if code != 250 or not qid:
        raise c.fail(f"{c.nodes[i].node_id} answered {code} {text!r} to {msg.message_id}")
    return qid


def submit_batch(c: Cluster, targets: Sequence[int], count: int, acked: dict[str, str]) -> None:
    """`count` sequential 1 KiB submissions, round robin over `targets`; all must get 250."""
    for k in range(count):
        msg = make_message(KIB)
        acked[msg.message_id] = offer_ok(c, targets[k % len(targets)], msg)


def assert_queue_is_exactly(c: Cluster, acked: dict[str, str]) -> None:
    """Every live node holds exactly the acknowledged ids: none lost, none doubled, no extras."""
    assert_acked_once(c, acked)
    want = sorted(acked.values())
    for i in c.live_indexes():
        got = c.queue_ids(i)
        assert got == want, (
            f"{c.nodes[i].node_id}: {len(got)} queued, {len(want)} acknowledged; "
            f"extra {sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
        )


# --- a healthy cluster --------------------------------------------------------------------


def test_every_250_is_one_entry_on_every_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    targets = [lead, *(i for i in range(len(c.nodes)) if i != lead)]
    jobs = [(i, make_message(2 * KIB)) for _ in range(4) for i in targets]

    def run(job: tuple[int, TestMessage]) -> tuple[int, str, str | None]:
        return offer(c, *job)

    with ThreadPoolExecutor(max_workers=6) as pool:  # concurrent sessions share commits
        replies = list(pool.map(run, jobs))

    acked: dict[str, str] = {}
    for (i, msg), (code, text, qid) in zip(jobs, replies, strict=True):
        if code != 250 or not qid:
            raise c.fail(f"{c.nodes[i].node_id} answered {code} {text!r} to {msg.message_id}")
        acked[msg.message_id] = qid
    assert len(set(acked.values())) == len(jobs), "two messages were given the same queue id"

    c.wait_applied_equal()
    assert_acked_once(c, acked)
    accepted_by = {msg.message_id: c.nodes[i].node_id for i, msg in jobs}
    for i in c.live_indexes():
        for m in c.queue_messages(i):
            if m["message_id"] in accepted_by:
                assert m["accepted_by"] == accepted_by[m["message_id"]], m


@pytest.mark.parametrize("size", [KIB, 100 * KIB, 5 * MIB], ids=["1KiB", "100KiB", "5MiB"])
def test_body_sizes_end_to_end(shared_cluster: Cluster, size: int) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    follower = next(i for i in c.live_indexes() if i != lead)
    sent: dict[str, TestMessage] = {}
    for target in (lead, follower):
        msg = make_message(size)
        sent[offer_ok(c, target, msg, timeout_s=120)] = msg

    c.wait_applied_equal(timeout_s=60)
    for i in c.live_indexes():
        for qid, msg in sent.items():
            entry = c.queue_entry(i, qid)
            assert entry is not None, f"{c.nodes[i].node_id}: {qid} missing"
            # Stored as received plus one Received header in front (nothing else changes).
            stored = c.queue_body(i, qid)
            assert stored.endswith(msg.data), (c.nodes[i].node_id, qid, len(stored), msg.size)
            assert stored.startswith(b"Received: from "), stored[:80]
            assert entry["size"] == len(stored)
            assert entry["body_sha256"] == hashlib.sha256(stored).hexdigest()
            assert entry["message_id"] == msg.message_id
            assert entry["mail_from"] == SENDER
            assert [r["address"] for r in entry["recipients"]] == [RCPT]


@pytest.mark.parametrize("size", [2 * KIB, 100 * KIB], ids=["inline", "chunked"])
def test_retried_identical_submission_is_one_entry(shared_cluster: Cluster, size: int) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    follower = next(i for i in c.live_indexes() if i != lead)
    msg = make_message(size)
    first = offer_ok(c, follower, msg)
    again = offer_ok(c, follower, msg)  # the client lost our 250 and retries
    elsewhere = offer_ok(c, lead, msg)  # ... or retries through another node
    assert again == first and elsewhere == first, (first, again, elsewhere)
    c.wait_applied_equal()
    assert_acked_once(c, {msg.message_id: first})


def test_oversize_message_gets_552(shared_cluster: Cluster) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    msg = make_message(TEST_MAX_MESSAGE_BYTES + 16 * KIB)
    follower = next(i for i in c.live_indexes() if i != lead)
    code, text, _ = offer(c, follower, msg, timeout_s=60)
    assert code == 552, (code, text)
    c.wait_applied_equal()
    assert_not_queued(c, [msg.message_id])


def test_too_many_recipients_gets_452(shared_cluster: Cluster) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    rcpts = [f"r{k}@example.test" for k in range(TEST_MAX_RECIPIENTS + 1)]
    too_many = make_message(KIB)
    code, text, _ = offer(c, lead, too_many, rcpts)
    assert code == 452, (code, text)

    at_limit = make_message(KIB)
    qid = offer_ok(c, lead, at_limit, rcpts[:TEST_MAX_RECIPIENTS])
    c.wait_applied_equal()
    assert_not_queued(c, [too_many.message_id])
    entry = c.queue_entry(lead, qid)
    assert entry is not None
    assert [r["address"] for r in entry["recipients"]] == rcpts[:TEST_MAX_RECIPIENTS]


def test_status_json_and_table(shared_cluster: Cluster, run_cli: RunCli) -> None:
    c = shared_cluster
    lead = c.wait_for_leader()
    docs = []
    for node in c.nodes:
        res = run_cli("status", "--admin", node.admin_addr, "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert set(doc) >= STATUS_FIELDS, STATUS_FIELDS - set(doc)
        assert doc["node_id"] == node.node_id
        assert doc["role"] in ("leader", "follower", "candidate")
        assert (doc["raft_addr"], doc["smtp_addr"], doc["admin_addr"]) == (
            node.raft_addr,
            node.smtp_addr,
            node.admin_addr,
        )
        for key in ("term", "commit_index", "last_applied"):
            assert isinstance(doc[key], int) and doc[key] >= 0, (key, doc[key])
        assert {"active", "deferred", "hold"} <= set(doc["queue"])
        assert all(isinstance(doc["queue"][k], int) for k in ("active", "deferred", "hold"))
        assert isinstance(doc["lease_held"], bool) and isinstance(doc["has_quorum"], bool)
        docs.append(doc)
    assert [d["role"] == "leader" for d in docs].count(True) == 1, [d["role"] for d in docs]
    assert docs[lead]["role"] == "leader" and docs[lead]["has_quorum"] is True
    assert {d["leader_id"] for d in docs} == {c.nodes[lead].node_id}
    assert {d["leader_raft_addr"] for d in docs} == {c.nodes[lead].raft_addr}

    table = run_cli("status", "--admin", c.nodes[lead].admin_addr)
    assert table.returncode == 0, table.stderr
    assert c.nodes[lead].node_id in table.stdout and "leader" in table.stdout
    assert "raft links" in table.stdout
    assert "sessions in the node's process" in table.stdout  # smtp_workers = 0
    assert docs[lead]["smtp_workers"] is None


# pysyncobj's connectionTimeout as RaftNode sets it: max(3.5 s, 2 x election max).
CONNECTION_TIMEOUT_S = 3.5


def test_idle_links_between_followers_stay_fresh(shared_cluster: Cluster) -> None:
    """Followers never talk to each other; without the keep-alive their link went stale.

    pysyncobj then dropped the first vote request after a leader crash (the
    send that noticed the stale link), which cost failover a second election
    round. Every node must have heard from every peer within the timeout.
    """
    c = shared_cluster
    c.wait_for_leader()
    time.sleep(CONNECTION_TIMEOUT_S + 1.0)  # longer than a link may stay quiet
    for i, node in enumerate(c.nodes):
        heard = c.status(i)["peer_last_heard_s"]
        others = {n.raft_addr for n in c.nodes if n is not node}
        assert set(heard) == others, heard
        stale = {a: s for a, s in heard.items() if s is None or s >= CONNECTION_TIMEOUT_S}
        assert not stale, f"{node.node_id}: {stale}"


# --- failures -----------------------------------------------------------------------------


def test_restart_one_then_kill_all_keeps_every_ack_once(tmp_path: Path) -> None:
    # Small compaction threshold: the node that was down must catch up from snapshot + log.
    tuning = (*FAST_TUNING, "--log-compaction-min-entries", "20")
    with Cluster(tmp_path / "cluster", n=3, extra_args=tuning) as c:
        acked: dict[str, str] = {}
        lead = c.wait_for_leader()
        submit_batch(c, [0, 1, 2], 6, acked)

        down = next(i for i in c.live_indexes() if i != lead)
        c.kill(down)
        submit_batch(c, c.live_indexes(), 30, acked)
        c.start_node(down)
        c.wait_for_leader()
        c.wait_applied_equal(timeout_s=30)
        assert_queue_is_exactly(c, acked)

        c.restart(lead)  # graceful (SIGTERM) restart of the leader
        c.wait_for_leader()
        submit_batch(c, [0, 1, 2], 6, acked)
        c.wait_applied_equal(timeout_s=30)
        assert_queue_is_exactly(c, acked)

        for i in range(len(c.nodes)):
            c.kill(i)
        c.start()  # all three again, same data dirs; waits for a leader
        c.wait_applied_equal(timeout_s=30)
        assert_queue_is_exactly(c, acked)

        submit_batch(c, [0, 1, 2], 3, acked)  # and the restarted cluster still takes mail
        c.wait_applied_equal()
        assert_queue_is_exactly(c, acked)


def test_kill_one_of_three_others_keep_accepting(cluster: Cluster) -> None:
    c = cluster
    acked: dict[str, str] = {}
    lead = c.wait_for_leader()
    submit_batch(c, [0, 1, 2], 3, acked)
    c.kill(lead)  # the harder case: the survivors must elect a new leader
    c.wait_for_leader()
    survivors = c.live_indexes()
    assert len(survivors) == 2
    submit_batch(c, survivors, 6, acked)
    c.wait_applied_equal()
    assert_queue_is_exactly(c, acked)

    c.start_node(lead)  # the old leader comes back and catches up
    c.wait_for_leader()
    c.wait_applied_equal(timeout_s=30)
    assert_queue_is_exactly(c, acked)


@pytest.mark.parametrize("survivor_role", ["leader", "follower"])
def test_kill_two_of_three_never_250(cluster: Cluster, survivor_role: str) -> None:
    c = cluster
    acked: dict[str, str] = {}
    lead = c.wait_for_leader()
    survivor = lead if survivor_role == "leader" else next(i for i in c.followers())
    submit_batch(c, [survivor], 1, acked)
    c.wait_applied_equal()
    for i in range(len(c.nodes)):
        if i != survivor:
            c.kill(i)

    refused = [make_message(KIB) for _ in range(2)]
    replies = [offer(c, survivor, msg, timeout_s=30) for msg in refused]
    assert all(code != 250 for code, _, _ in replies), replies
    assert [code for code, _, _ in replies] == [451] * len(refused), replies
    assert all(" 4.3.0 " in f" {text} " for _, text, _ in replies), replies

    c.start()  # the others return: what was acknowledged before is still there, once
    c.wait_applied_equal(timeout_s=30)
    assert_acked_once(c, acked)

    # A 451 after a commit timeout leaves the outcome unknown (the entry may commit now
    # that a majority is back). The client retries; it must end as one entry either way.
    for msg in refused:
        acked[msg.message_id] = offer_ok(c, survivor, msg)
    c.wait_applied_equal()
    assert_queue_is_exactly(c, acked)


# --- command line -------------------------------------------------------------------------


def _assert_one_line_exit_2(res: subprocess.CompletedProcess[str], *keywords: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1, f"expected a one-line error, got:\n{res.stderr}"
    norm = lines[0].lower().replace("-", "_")
    assert any(k in norm for k in keywords), f"error does not name {keywords}: {lines[0]!r}"


BAD_FLAGS: list[tuple[str, dict[str, str | None], tuple[str, ...]]] = [
    ("unknown flag", {"bogus-flag": "1"}, ("bogus",)),
    ("raft addr without port", {"raft-addr": "127.0.0.1"}, ("raft_addr",)),
    ("non-numeric size", {"max-message-bytes": "lots"}, ("max_message_bytes",)),
    ("zero recipients", {"max-recipients": "0"}, ("max_recipients",)),
    (
        "election min above max",
        {"election-timeout-min-ms": "900", "election-timeout-max-ms": "300"},
        ("election_timeout",),
    ),
    ("missing node id", {"node-id": None}, ("node_id",)),
    ("no secret flag", {"cluster-secret-file": None}, ("secret",)),
]


@pytest.mark.parametrize(("case", "change", "keywords"), BAD_FLAGS, ids=[b[0] for b in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(
    run_cli: RunCli,
    node_args: dict[str, str],
    case: str,
    change: dict[str, str | None],
    keywords: tuple[str, ...],
) -> None:
    args = dict(node_args)
    for key, value in change.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value
    _assert_one_line_exit_2(run_cli("run", *flags(args)), *keywords)


def test_peers_containing_self_exit_2(run_cli: RunCli, node_args: dict[str, str]) -> None:
    args = dict(node_args, peers=f"{node_args['raft-addr']},{node_args['peers']}")
    _assert_one_line_exit_2(run_cli("run", *flags(args)), "peers")


@pytest.mark.parametrize("problem", ["missing", "world-readable", "too short"])
def test_bad_secret_file_exit_2(
    run_cli: RunCli, node_args: dict[str, str], tmp_path: Path, problem: str
) -> None:
    secret = tmp_path / "bad-secret"
    if problem == "world-readable":
        secret.write_text("a-long-enough-secret-value\n", encoding="utf-8")
        os.chmod(secret, 0o644)
    elif problem == "too short":
        secret.write_text("short\n", encoding="utf-8")
        os.chmod(secret, 0o600)
    args = dict(node_args)
    args["cluster-secret-file"] = str(secret)
    _assert_one_line_exit_2(run_cli("run", *flags(args)), "secret")


@pytest.mark.parametrize(
    ("toml", "keywords"),
    [("max_recipients = [", ("config", "toml")), ("colour = 'blue'\n", ("colour",))],
    ids=["invalid TOML", "unknown key"],
)
def test_bad_config_file_exit_2(
    run_cli: RunCli, node_args: dict[str, str], tmp_path: Path, toml: str, keywords: tuple[str, ...]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(toml, encoding="utf-8")
    res = run_cli("run", "--config", str(config), *flags(node_args))
    _assert_one_line_exit_2(res, *keywords)


@pytest.mark.parametrize(
    ("text", "keywords"),
    [
        ('[[rule]]\ncategory = "nice"\nreply = "x"\n', ("rule 1", "category")),
        ('[[rule]]\ncategory = "policy"\nreply = "(unclosed"\n', ("rule 1", "pattern")),
        (None, ("no_such.toml",)),
    ],
    ids=["unknown category", "bad pattern", "missing file"],
)
def test_bad_bounce_rules_file_exit_2(
    run_cli: RunCli,
    node_args: dict[str, str],
    tmp_path: Path,
    text: str | None,
    keywords: tuple[str, ...],
) -> None:
    rules = tmp_path / ("rules.toml" if text is not None else "no-such.toml")
    if text is not None:
        rules.write_text(text, encoding="utf-8")
    args = dict(node_args, **{"bounce-rules-file": str(rules)})
    _assert_one_line_exit_2(run_cli("run", *flags(args)), *keywords)


def test_a_message_answered_250_reads_as_queued_at_once(tmp_path: Path) -> None:
    """The node answers SMTP once the entry is committed and in its journal, before its
    state's commit (raft/node.py `early`); its queue reads wait for that commit
    (`answered_readable`), so `queue show` and `queue list` right after a 250 find the
    message. Big messages (the leader is longest between the answer and the commit while
    it sends them to its followers) and small ones, to the leader and to a follower."""
    with Cluster(tmp_path, extra_args=(*FAST_TUNING, "--smtp-workers", "2")) as c:
        leader = c.leader()
        for k in range(24):
            i = leader if k % 2 == 0 else c.followers()[0]
            msg = make_attachment(MIB) if k % 3 == 0 else make_message(KIB)
            qid = offer_ok(c, i, msg)
            shown = c.try_get(i, f"/queue/{qid}")
            assert shown is not None and shown["id"] == qid, (k, c.nodes[i].node_id, qid)
            listed = {m["id"] for m in c.get(i, "/queue")["messages"]}
            assert qid in listed, (k, c.nodes[i].node_id, qid)
