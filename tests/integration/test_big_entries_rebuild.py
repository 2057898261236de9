"""Bodies kept deflated, in the journal and in the state, through kill -9 and a rebuild.

A text body that deflates well is deflated where it is accepted and kept so in
every node's state (mqnode/compression.py); one too big to fit an entry even
deflated goes in chunks, and a node stores each chunk's entry in its journal
as it went to the followers, deflated when it compresses (raft/logstore.py).
Here every node is killed with SIGKILL and restarted as after an OS crash (its
queue state, which is not fsynced, is discarded and rebuilt from the journal
alone), so every body is read back from journal records, deflated and not.
Each node must then hold every acknowledged message with the very bytes it
stored before, and deliver each once, intact.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lmdb
import msgpack
import pytest

from mqnode.devtools.devsink import read_sink
from mqnode.spool.store import UNSYNCED_MARKER
from tests.support.cluster import FAST_TUNING, Cluster, free_ports
from tests.support.smtp import make_attachment, make_message, make_prose, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ARGS = (*FAST_TUNING, "--retry-base-s", "1", "--retry-max-s", "2")
TEXT_BYTES = 200 * 1024
PROSE_BYTES = 2_500_000  # deflates to ~45%: more than an inline entry holds


def _deflated_state_bodies(data_dir: Path) -> int:
    """How many body records of a node's state are kept deflated (their CRC inverted)."""
    env = lmdb.open(str(data_dir / "state"), readonly=True, max_dbs=16, lock=True)
    try:
        with env.begin() as txn:
            db = env.open_db(b"body", txn=txn, create=False)
            return sum(
                int.from_bytes(raw[:4], "big") == zlib.crc32(raw[4:]) ^ 0xFFFFFFFF
                for _key, raw in txn.cursor(db=db)
            )
    finally:
        env.close()


def _journal_records(data_dir: Path) -> list[list[object]]:
    """Every record of a node's Raft journal as msgpack items (a running node: read-only)."""
    env = lmdb.open(str(data_dir / "raft"), readonly=True, max_dbs=4, lock=True)
    try:
        with env.begin() as txn:
            db = env.open_db(b"log", txn=txn, create=False)
            return [msgpack.unpackb(bytes(raw)[4:]) for _key, raw in txn.cursor(db=db)]
    finally:
        env.close()


def test_every_body_survives_kill_and_a_rebuild_from_deflated_journal_records(
    tmp_path: Path,
) -> None:
    sink_port = free_ports(1)[0]  # nothing listens yet: every delivery defers
    out = tmp_path / "sink.jsonl"
    with Cluster(tmp_path / "c", extra_args=ARGS, relay_host=f"127.0.0.1:{sink_port}") as c:
        c.wait_for_leader()
        sent: dict[str, str] = {}  # Message-ID -> queue id
        originals: dict[str, bytes] = {}
        for k in range(10):
            if k % 3 == 2:
                msg = make_attachment(110_000 * 4 // 3)
            elif k in (1, 4):
                msg = make_prose(PROSE_BYTES)
            else:
                msg = make_message(TEXT_BYTES)
            message_id, data = msg.message_id, msg.data
            i = k % 3
            code, text, qid = submit(
                "127.0.0.1", c.nodes[i].smtp_port, "a@client.test", ["r@example.test"], data
            )
            assert code == 250 and qid, (code, text)
            sent[message_id], originals[message_id] = qid, data
        c.wait_applied_equal()
        stored = {qid: c.queue_body(c.leader(), qid) for qid in sent.values()}
        for message_id, qid in sent.items():
            assert stored[qid].endswith(originals[message_id])

        # Text went into the states deflated; the chunks of the prose too big for that
        # into the journals deflated; the attachments as they are.
        for i in range(3):
            assert _deflated_state_bodies(c.nodes[i].data_dir) == 5
        records = _journal_records(c.nodes[0].data_dir)
        deflated = [r for r in records if len(r) == 3]
        assert len(deflated) >= 4, f"{len(deflated)} deflated records of {len(records)}"
        assert sum(len(r[1]) for r in deflated) < 2 * PROSE_BYTES * 3 // 5

        # As after an OS crash: killed, and each state's marker from another boot, so
        # every node discards its state and rebuilds it from the journal.
        for i in range(3):
            c.kill(i)
        for i in range(3):
            (c.nodes[i].data_dir / "state" / UNSYNCED_MARKER).write_text("another-boot\n")
        for i in range(3):
            c.start_node(i)
        c.wait_for_leader(timeout_s=30)
        c.wait_applied_equal(timeout_s=30)
        for i in range(3):
            assert "rebuilt from snapshot.bin and the Raft log" in c.nodes[i].log_path.read_text()
            assert c.queue_ids(i) == sorted(sent.values())
            for qid, body in stored.items():
                assert c.queue_body(i, qid) == body, f"{c.nodes[i].node_id} {qid} differs"

        sink = subprocess.Popen(
            [sys.executable, "-m", "mqnode.devtools.devsink", "--listen",
             f"127.0.0.1:{sink_port}", "--out", str(out)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while sum(c.status(c.leader())["queue"].values()) and time.monotonic() < deadline:
                time.sleep(0.3)
            assert sum(c.status(c.leader())["queue"].values()) == 0, c.status(c.leader())
        finally:
            sink.terminate()
            sink.wait(timeout=10)
    records = read_sink(out)
    got = {r["message_id"]: r for r in records}
    assert len(records) == len(sent) and set(got) == set(sent)
    for message_id, qid in sent.items():
        assert got[message_id]["sha256"] == hashlib.sha256(stored[qid]).hexdigest()
