"""A deep queue, built fast and honestly: a snapshot holding N deferred messages.

Queuing a million messages through SMTP takes most of an hour on the bench
machine and measures nothing the other workloads do not. This builds the
same state without the sessions: the product's own state machine
(spool/statemachine.py) applies real `Enqueue` commands, each followed by the
`RecordOutcome` a dead destination gives it ("4.4.1 ... connection refused",
one attempt, the next one due within `spread_s`), in log entries of
`PER_ENTRY` commands, into a queue state opened on a seed node's snapshot.
The result is written as a snapshot with the seed's Raft position, which
`mqnode restore` turns into a data dir, exactly as an operator restores a
backup; followers added with `cluster add-node` catch up from it.

What differs from a state made through SMTP: the Raft log never held these
entries (the restored node's log starts at the snapshot, as any restored or
compacted node's does), and the bodies are smtp-source-like text.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from mqnode.raft.snapshot_file import install, read_header, write_snapshot
from mqnode.spool.commands import Command, Enqueue, RecordOutcome, encode_entry
from mqnode.spool.model import make_queue_id
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

PER_ENTRY = 200  # commands per log entry (100 messages)
ENTRIES_PER_COMMIT = 50  # log entries per LMDB commit
DEAD_REPLY = "4.4.1 delivery temporarily suspended: connection refused"
MAP_SIZE_MB = 4096  # the node's default state_map_size_mb


@dataclass(frozen=True)
class Built:
    messages: int
    seconds: float
    snapshot_bytes: int


def body_of(size: int, seq: int) -> bytes:
    """A message of about `size` bytes: headers, then lines of text (like smtp-source's)."""
    head = (
        f"From: <sender@source.bench.test>\r\nTo: <u@dead.bench.test>\r\n"
        f"Subject: deep queue {seq}\r\nMessage-ID: <deep{seq}@source.bench.test>\r\n\r\n"
    ).encode()
    line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def build_snapshot(
    seed: Path,
    dest: Path,
    work: Path,
    messages: int,
    rcpt: str,
    spread_s: float,
    size: int = 1024,
    seed_random: int = 1,
) -> Built:
    """Write to `dest` the seed snapshot's state plus `messages` deferred messages."""
    t0 = time.monotonic()
    rng = random.Random(seed_random)
    header = read_header(seed)
    store = QueueStore(work, MAP_SIZE_MB)
    try:
        install(seed, store)
        sm = QueueStateMachine()
        now_ms = int(time.time() * 1000)
        epoch = sm.lease_epoch(store.apply_txn())
        index = header.index
        batch: list[Command] = []
        entries = 0
        for seq in range(messages):
            received = now_ms - 3_600_000 + seq * 3_600_000 // messages  # over the last hour
            qid = make_queue_id(received, rng.randbytes(8))
            body = body_of(size, seq)
            batch.append(
                Enqueue(
                    queue_id=qid,
                    received_ms=received,
                    mail_from="sender@source.bench.test",
                    recipients=(rcpt,),
                    body=body,
                    upload_id="",
                    chunks=0,
                    body_size=len(body),
                    body_sha256=hashlib.sha256(body).digest(),
                    idem_key=rng.randbytes(32),
                    message_id=f"<deep{seq}@source.bench.test>",
                    client="127.0.0.1",
                    node_id="n1",
                )
            )
            batch.append(
                RecordOutcome(
                    queue_id=qid,
                    at_ms=now_ms,
                    results=((0, "deferred", DEAD_REPLY),),
                    next_attempt_ms=now_ms + int(rng.random() * spread_s * 1000),
                    epoch=epoch,
                    dsn_queue_id="",
                    dsn_body=b"",
                )
            )
            if len(batch) >= PER_ENTRY or seq == messages - 1:
                index += 1
                results = sm.apply(index, encode_entry(batch), store.apply_txn())
                if results is None or any(r[0] not in ("queued", "ok") for r in results):
                    raise RuntimeError(f"building the deep state: {results and results[:2]}")
                batch = []
                entries += 1
                if entries % ENTRIES_PER_COMMIT == 0:
                    store.commit_apply()
        # The restored node's log starts at the seed's position: the state says it is there.
        store.apply_txn().set_applied_index(header.index)
        store.commit_apply()
        write_snapshot(dest, store, header.last, header.prev, header.cluster)
    finally:
        store.close()
    return Built(messages, time.monotonic() - t0, os.path.getsize(dest))
