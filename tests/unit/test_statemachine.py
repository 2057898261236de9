"""QueueStateMachine transcripts: commands in, LMDB state out.

Each test feeds entries through a real `QueueStore` the way the Raft tick
does (apply into the tick's transaction, then commit) and checks the state
with the store's own readers or a raw dump of every named DB.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, fields, replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqnode.errors import NewerFormatError
from mqnode.spool.commands import (
    Announce,
    Claim,
    Command,
    Enqueue,
    LeaseRenew,
    PutChunk,
    QueueOp,
    RecordOutcome,
    encode_entry,
    to_wire,
)
from mqnode.spool.model import MessageState, RcptState, Recipient
from mqnode.spool.record_memo import RecordMemo
from mqnode.spool.statemachine import GC_BATCH, IDEM_WINDOW_MS, UPLOAD_TTL_MS, QueueStateMachine
from mqnode.spool.store import QueueStore, _decode_message

from .kit import T0, Transcript, chunked, dump, enqueue, fresh_store, outcome, queued_message

_U64 = struct.Struct(">Q")
NO_COUNTS = {"active": 0, "deferred": 0, "hold": 0}


def _keys(store: QueueStore, db: str) -> list[bytes]:
    return [k for k, _ in dump(store)[db]]


def _without_meta(store: QueueStore) -> dict[str, list[tuple[bytes, bytes]]]:
    d = dump(store)
    del d["meta"]
    return d


# -- enqueue -------------------------------------------------------------------------------


def test_enqueue_inline_body(tx: Transcript, store: QueueStore) -> None:
    body = b"Subject: hi\r\n\r\nhello\r\n"
    cmd = enqueue("Q1", T0, ("a@example.com", "b@example.com"), body, idem=b"k1")
    assert tx.apply(cmd) == [("queued", "Q1")]

    msg = store.get_message("Q1")
    assert msg is not None
    assert msg.mail_from == "sender@example.com"
    assert [r.address for r in msg.recipients] == ["a@example.com", "b@example.com"]
    assert all(r.state is RcptState.PENDING and r.attempts == 0 for r in msg.recipients)
    assert (msg.size, msg.body_sha256) == (len(body), hashlib.sha256(body).digest())
    assert (msg.received_ms, msg.next_attempt_ms, msg.attempts) == (T0, T0, 0)
    assert (msg.accepted_by, msg.message_id) == ("n1", "<Q1@test>")
    assert msg.state() is MessageState.ACTIVE
    assert store.read_body(msg) == body
    assert [m.queue_id for m in store.due_messages(T0, 10)] == ["Q1"]
    assert store.due_messages(T0 - 1, 10) == []
    assert store.counts() == {**NO_COUNTS, "active": 1}
    assert store.applied_index() == 1
    assert _keys(store, "idem") == [b"k1"]


def test_one_result_per_command_and_one_index_per_entry(tx: Transcript, store: QueueStore) -> None:
    results = tx.apply(
        enqueue("Q1", idem=b"k1"),
        enqueue("Q2", idem=b"k2"),
        enqueue("Q3", idem=b"k1"),
        Announce("127.0.0.1:7001", "n1", "127.0.0.1:2525", "127.0.0.1:8025", 2),
    )
    assert results == [("queued", "Q1"), ("queued", "Q2"), ("duplicate", "Q1"), ("ok", "")]
    assert store.applied_index() == 1
    assert store.counts()["active"] == 2


def test_replaying_an_applied_index_is_a_no_op(tx: Transcript, store: QueueStore) -> None:
    entry = encode_entry([enqueue("Q1")])
    assert tx.apply_raw(1, entry) == [("queued", "Q1")]
    tx.apply(outcome("Q1", [(0, "deferred", "451 later")]))
    before = dump(store)

    assert tx.apply_raw(1, entry) is None
    assert tx.apply_raw(2, encode_entry([enqueue("Q9", idem=b"other")])) is None
    assert tx.apply_raw(0, encode_entry([enqueue("Q8", idem=b"more")])) is None
    assert dump(store) == before
    assert store.applied_index() == 2


def test_duplicate_idempotency_key_returns_first_id(tx: Transcript, store: QueueStore) -> None:
    assert tx.one(enqueue("Q1", idem=b"same")) == ("queued", "Q1")
    assert tx.one(enqueue("Q2", T0 + 5, idem=b"same", body=b"other")) == ("duplicate", "Q1")
    assert [m.queue_id for m in store.list_messages(10)] == ["Q1"]
    assert store.counts() == {**NO_COUNTS, "active": 1}
    assert len(_keys(store, "body")) == 1
    assert len(_keys(store, "due")) == 1
    assert _keys(store, "idem") == [b"same"]


def test_duplicate_queue_id_is_not_queued_twice(tx: Transcript, store: QueueStore) -> None:
    assert tx.one(enqueue("Q1", idem=b"a")) == ("queued", "Q1")
    assert tx.one(enqueue("Q1", idem=b"b", body=b"other")) == ("duplicate", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None and store.read_body(msg) != b"other"
    assert store.counts() == {**NO_COUNTS, "active": 1}


def test_idempotency_key_outlives_the_delivered_message(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", idem=b"k"))
    assert tx.one(outcome("Q1", [(0, "delivered", "250 ok")])) == ("ok", "complete")
    # A client retry of the same message (same key) after delivery is not queued again.
    assert tx.one(enqueue("Q2", T0 + 60_000, idem=b"k")) == ("duplicate", "Q1")
    assert store.list_messages(10) == []


def test_enqueue_without_recipients_is_rejected(tx: Transcript, store: QueueStore) -> None:
    status, reason = tx.one(enqueue("Q1", rcpts=()))
    assert status == "rejected" and "recipients" in reason
    assert _without_meta(store) == _without_meta_empty()
    assert store.applied_index() == 1


def _without_meta_empty() -> dict[str, list[tuple[bytes, bytes]]]:
    with fresh_store() as empty:
        return _without_meta(empty)


# -- chunked uploads -----------------------------------------------------------------------


@pytest.mark.parametrize("order", ["in-order", "reversed", "one-entry"])
def test_chunked_upload_reassembles_the_body(tx: Transcript, store: QueueStore, order: str) -> None:
    body = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: 3 chunks of 3000 and a short one
    puts, enq = chunked("Q1", body, 3000)
    if order == "one-entry":
        assert tx.apply(*puts) == [("ok", "")] * len(puts)
    else:
        for put in puts if order == "in-order" else reversed(puts):
            assert tx.one(put) == ("ok", "")
    assert len(_keys(store, "uploads")) == 1

    assert tx.one(enq) == ("queued", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None
    assert (msg.body_key, msg.body_chunks, msg.size) == ("Q1", 4, len(body))
    assert store.read_body(msg) == body
    assert _keys(store, "uploads") == [] and _keys(store, "uploads_by_time") == []


def test_enqueue_with_missing_chunks_is_rejected(tx: Transcript, store: QueueStore) -> None:
    body = b"x" * 1000
    puts, enq = chunked("Q1", body, 300)
    for put in puts:
        if put.seq != 2:
            tx.one(put)
    status, reason = tx.one(enq)
    assert status == "rejected" and "[2]" in reason
    assert store.list_messages(10) == []
    assert store.counts() == NO_COUNTS
    assert _keys(store, "due") == [] and _keys(store, "idem") == []

    # Nothing was remembered, so the missing chunk followed by the same Enqueue succeeds.
    tx.one(puts[2])
    assert tx.one(enq) == ("queued", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None and store.read_body(msg) == body


def test_duplicate_chunked_retry_drops_its_staged_chunks(tx: Transcript, store: QueueStore) -> None:
    body = b"y" * 1000
    puts1, enq1 = chunked("Q1", body, 400)
    puts2, enq2 = chunked("Q2", body, 400, at_ms=T0 + 10)
    enq2 = replace(enq2, idem_key=enq1.idem_key)
    tx.apply(*puts1)
    assert tx.one(enq1) == ("queued", "Q1")
    tx.apply(*puts2)
    assert tx.one(enq2) == ("duplicate", "Q1")
    assert all(k.startswith(b"Q1\0") for k in _keys(store, "body"))
    assert _keys(store, "uploads") == []
    # The same Enqueue committed twice (a pipeline retry) keeps the live body.
    assert tx.one(enq1) == ("duplicate", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None and store.read_body(msg) == body


# -- outcomes ------------------------------------------------------------------------------


def test_delivered_to_all_deletes_message_and_body(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", rcpts=("a@x.org", "b@x.org")))
    result = tx.one(outcome("Q1", [(0, "delivered", "250 ok"), (1, "delivered", "250 ok")]))
    assert result == ("ok", "complete")
    assert store.get_message("Q1") is None
    assert _keys(store, "msgs") == [] and _keys(store, "body") == [] and _keys(store, "due") == []
    assert store.counts() == NO_COUNTS


def test_partial_delivery_defers_the_message(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", rcpts=("a@x.org", "b@x.org")))
    next_ms = T0 + 300_000
    cmd = outcome("Q1", [(0, "delivered", "250 ok"), (1, "deferred", "451 later")], T0, next_ms)
    assert tx.one(cmd) == ("ok", "pending")

    msg = store.get_message("Q1")
    assert msg is not None
    assert (msg.attempts, msg.next_attempt_ms, msg.state()) == (1, next_ms, MessageState.DEFERRED)
    a, b = msg.recipients
    assert (a.state, a.attempts, a.last_reply) == (RcptState.DELIVERED, 1, "250 ok")
    assert (b.state, b.attempts, b.last_reply) == (RcptState.PENDING, 1, "451 later")
    assert store.counts() == {**NO_COUNTS, "deferred": 1}
    assert store.due_messages(next_ms - 1, 10) == []
    assert [m.queue_id for m in store.due_messages(next_ms, 10)] == ["Q1"]
    assert _keys(store, "due") == [_U64.pack(next_ms) + b"Q1"]

    # A second deferral moves the due key; the final delivery completes the message.
    tx.one(outcome("Q1", [(1, "deferred", "451 still")], next_ms, next_ms + 600_000))
    assert _keys(store, "due") == [_U64.pack(next_ms + 600_000) + b"Q1"]
    assert store.counts() == {**NO_COUNTS, "deferred": 1}
    assert tx.one(outcome("Q1", [(1, "delivered", "250 ok")])) == ("ok", "complete")
    assert store.counts() == NO_COUNTS and store.list_messages(10) == []


def test_bounce_is_final(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", rcpts=("a@x.org", "b@x.org")))
    tx.one(outcome("Q1", [(0, "bounced", "550 no such user"), (1, "deferred", "451")]))
    # A later report for a final recipient is ignored.
    tx.one(outcome("Q1", [(0, "delivered", "250 ok"), (1, "deferred", "451")]))
    msg = store.get_message("Q1")
    assert msg is not None
    a, b = msg.recipients
    assert (a.state, a.attempts, a.last_reply) == (RcptState.BOUNCED, 1, "550 no such user")
    assert (b.state, b.attempts) == (RcptState.PENDING, 2)
    # Bounced + delivered is complete.
    assert tx.one(outcome("Q1", [(1, "delivered", "250 ok")])) == ("ok", "complete")
    assert store.get_message("Q1") is None and store.counts() == NO_COUNTS


def test_bounce_of_every_recipient_completes(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    assert tx.one(outcome("Q1", [(0, "bounced", "550 5.1.1")])) == ("ok", "complete")
    assert store.list_messages(10) == [] and _keys(store, "body") == []


def test_outcome_for_unknown_message_is_rejected(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    before = _without_meta(store)
    assert tx.one(outcome("NOPE", [(0, "delivered", "250")])) == ("rejected", "no such message")
    assert _without_meta(store) == before
    assert store.applied_index() == 2


def test_outcome_with_out_of_range_index_leaves_recipients(
    tx: Transcript, store: QueueStore
) -> None:
    tx.one(enqueue("Q1"))
    tx.one(outcome("Q1", [(5, "delivered", "250"), (-1, "delivered", "250")]))
    msg = store.get_message("Q1")
    assert msg is not None
    assert [(r.state, r.attempts) for r in msg.recipients] == [(RcptState.PENDING, 0)]


def test_announce_records_the_node(tx: Transcript, store: QueueStore) -> None:
    tx.one(Announce("10.0.0.1:7001", "n1", "10.0.0.1:2525", "10.0.0.1:8025", 3))
    tx.one(Announce("10.0.0.1:7001", "n1", "10.0.0.1:2526", "10.0.0.1:8025", 4))
    with store.reader() as r:
        nodes = r.get_meta("nodes")
    assert nodes == {
        "10.0.0.1:7001": {
            "node_id": "n1",
            "smtp_addr": "10.0.0.1:2526",
            "admin_addr": "10.0.0.1:8025",
            "term": 4,
            "reads": 1,  # a first-release Announce carries no level
        }
    }
    tx.one(Announce("10.0.0.1:7001", "n1", "10.0.0.1:2526", "10.0.0.1:8025", 5, reads=2))
    with store.reader() as r:
        assert r.get_meta("nodes")["10.0.0.1:7001"]["reads"] == 2


# -- entries that cannot be applied ------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [b"\x00" + encode_entry([enqueue()])[1:], b"\x01\xc1", b"\x01", b"\x01\x93\x01\x02\x03"],
    ids=["version", "bad-msgpack", "no-payload", "not-a-command-list"],
)
def test_undecodable_entry_is_rejected_and_advances(
    tx: Transcript, store: QueueStore, entry: bytes
) -> None:
    tx.one(enqueue("Q1"))
    before = _without_meta(store)
    results = tx.apply_raw(2, entry)
    assert results is not None and len(results) == 1
    status, reason = results[0]
    assert status == "rejected" and reason.startswith("undecodable entry")
    assert store.applied_index() == 2
    assert _without_meta(store) == before


@pytest.mark.parametrize(
    "entry",
    [
        b"\x02" + encode_entry([enqueue()])[1:],
        b"\x01" + msgpack.packb([[99, "x"]]),
        b"\x01" + msgpack.packb([[*to_wire(enqueue()), "", "", [], [], "", "a newer field"]]),
    ],
    ids=["format-byte", "command-tag", "more-fields"],
)
def test_an_entry_from_a_newer_version_raises_and_is_not_applied(
    tx: Transcript, store: QueueStore, entry: bytes
) -> None:
    """Skipping it would let this node's queue diverge from its upgraded peers'."""
    tx.one(enqueue("Q1"))
    before = _without_meta(store)
    with pytest.raises(NewerFormatError):
        tx.apply_raw(2, entry)
    assert store.applied_index() == 1
    assert _without_meta(store) == before


def _raw_entry(*items: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(list(items), use_bin_type=True)
    return b"\x01" + packed


_ENQ_FIELDS = ["Q9", T0, "f@x.org", ["a@x.org"], b"body", "", 0, 4, b"", b"k9", "<m>", "c", "n"]


def _enq_with(**changes: Any) -> list[Any]:
    names = [f.name for f in fields(Enqueue)]
    values = list(_ENQ_FIELDS)
    for name, value in changes.items():
        values[names.index(name)] = value
    return [Enqueue.TAG, *values]


@pytest.mark.parametrize(
    "entry",
    [
        _raw_entry([RecordOutcome.TAG, "Q1", T0, [[0]], T0]),
        _raw_entry([RecordOutcome.TAG, "Q1", T0, [[0, "delivered", "ok", "x"]], T0]),
        _raw_entry(_enq_with(queue_id=5)),
        _raw_entry(_enq_with(received_ms="soon")),
        _raw_entry(_enq_with(idem_key=b"")),
        _raw_entry(_enq_with(queue_id="")),
        _raw_entry(_enq_with(queue_id="Q" * 600)),
        _raw_entry([PutChunk.TAG, "", 0, b"x", T0]),
        _raw_entry([PutChunk.TAG, "U1", 0, "not-bytes", T0]),
    ],
    ids=[
        "results-2-short",
        "results-1-long",
        "int-queue-id",
        "str-received-ms",
        "empty-idem-key",
        "empty-queue-id",
        "oversized-queue-id",
        "empty-upload-id",
        "str-chunk-data",
    ],
)
def test_decodable_but_malformed_entry_is_rejected_not_raised(
    tx: Transcript, store: QueueStore, entry: bytes
) -> None:
    # spool/statemachine.py promises: invalid input "is rejected the same way on every node and
    # recorded as a result; it never raises past here". An exception here is retried by the
    # Raft tick forever on every node (RaftNode._run rolls back and re-applies the entry).
    tx.one(enqueue("Q1"))
    results = tx.apply_raw(2, entry)
    assert results is not None and results[0][0] == "rejected"
    assert store.applied_index() == 2


# -- expiry of idempotency keys and stale uploads ----------------------------------------------


def test_idempotency_key_expires_after_its_window(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", T0, idem=b"k"))
    assert tx.one(enqueue("Q2", T0 + IDEM_WINDOW_MS, idem=b"k")) == ("duplicate", "Q1")
    assert tx.one(enqueue("Q3", T0 + IDEM_WINDOW_MS + 1, idem=b"k")) == ("queued", "Q3")
    with store.reader() as r:
        assert r.get_idem(b"k") == "Q3"


def test_idempotency_expiry_is_bounded_per_enqueue(tx: Transcript, store: QueueStore) -> None:
    n = 2 * GC_BATCH + 8
    tx.apply(*(enqueue(f"A{i:03}", T0, idem=f"k{i:03}".encode()) for i in range(n)))
    later = T0 + IDEM_WINDOW_MS + 1
    remaining = n
    for round_ in range(3):
        tx.one(enqueue(f"B{round_}", later, idem=f"new{round_}".encode()))
        remaining -= min(GC_BATCH, remaining)
        assert len(_keys(store, "idem")) == remaining + round_ + 1
        assert len(_keys(store, "idem_by_time")) == remaining + round_ + 1
    assert remaining == 0
    # Expiry only forgets keys: the messages themselves stay queued.
    assert store.counts()["active"] == n + 3


def test_stale_upload_expires_after_its_ttl(tx: Transcript, store: QueueStore) -> None:
    puts, enq = chunked("U1", b"z" * 900, 300)
    tx.apply(*puts)
    tx.one(enqueue("X1", T0 + UPLOAD_TTL_MS, idem=b"x1"))
    assert len(_keys(store, "uploads")) == 1
    assert sum(k.startswith(b"U1\0") for k in _keys(store, "body")) == 3

    tx.one(enqueue("X2", T0 + UPLOAD_TTL_MS + 1, idem=b"x2"))
    assert _keys(store, "uploads") == [] and _keys(store, "uploads_by_time") == []
    assert not any(k.startswith(b"U1\0") for k in _keys(store, "body"))
    status, _ = tx.one(replace(enq, received_ms=T0 + UPLOAD_TTL_MS + 2))
    assert status == "rejected"


def test_upload_expiry_is_bounded_per_enqueue(tx: Transcript, store: QueueStore) -> None:
    n = GC_BATCH + 4
    for i in range(n):
        puts, _ = chunked(f"U{i:03}", b"c" * 20, 10, at_ms=T0 + i)
        tx.apply(*puts)
    later = T0 + n + UPLOAD_TTL_MS + 1
    tx.one(enqueue("X1", later, idem=b"x1"))
    assert len(_keys(store, "uploads")) == n - GC_BATCH
    # Oldest first: the survivors are the newest uploads, with both their chunks.
    survivors = [f"U{i:03}".encode() for i in range(GC_BATCH, n)]
    assert _keys(store, "uploads") == survivors
    staged = [k for k in _keys(store, "body") if k.startswith(b"U")]
    assert staged == sorted(s + b"\0" + struct.pack(">I", q) for s in survivors for q in (0, 1))
    tx.one(enqueue("X2", later, idem=b"x2"))
    assert _keys(store, "uploads") == []
    assert not any(k.startswith(b"U") for k in _keys(store, "body"))


def test_upload_expiry_spares_enqueued_bodies(tx: Transcript, store: QueueStore) -> None:
    body = b"q" * 700
    puts, enq = chunked("Q1", body, 300)
    tx.apply(*puts)
    tx.one(enq)
    tx.one(enqueue("X1", T0 + UPLOAD_TTL_MS + 1, idem=b"x1"))
    msg = store.get_message("Q1")
    assert msg is not None and store.read_body(msg) == body


# -- determinism over random transcripts ---------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One message as ingress would make it: fixed id, idem key, body and transport."""

    queue_id: str
    idem: bytes
    body: bytes
    chunk_bytes: int  # 0: inline body
    rcpts: tuple[str, ...]

    def puts(self, at_ms: int) -> list[PutChunk]:
        return chunked(self.queue_id, self.body, self.chunk_bytes, at_ms)[0]

    def enqueue(self, at_ms: int) -> Enqueue:
        if self.chunk_bytes:
            enq = chunked(self.queue_id, self.body, self.chunk_bytes, at_ms)[1]
            return replace(enq, idem_key=self.idem, recipients=self.rcpts)
        return enqueue(self.queue_id, at_ms, self.rcpts, self.body, idem=self.idem)


slots = st.lists(
    st.builds(
        Slot,
        queue_id=st.just(""),
        idem=st.sampled_from([b"k0", b"k1", b"k2", b"k3"]),
        body=st.binary(min_size=1, max_size=120),
        chunk_bytes=st.sampled_from([0, 0, 16, 50]),
        rcpts=st.lists(
            st.sampled_from(["a@x.org", "b@y.org", "c@z.org", "d@X.Org"]), min_size=0, max_size=3
        ).map(tuple),
    ),
    min_size=1,
    max_size=5,
).map(lambda ss: [Slot(f"Q{i}", s.idem, s.body, s.chunk_bytes, s.rcpts) for i, s in enumerate(ss)])

time_steps = st.sampled_from([0, 1, 1000, 300_000, UPLOAD_TTL_MS + 1, IDEM_WINDOW_MS + 1])
ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["put", "put", "enq", "enq", "out", "out", "ann", "junk", "hold", "rel", "claim"]
        ),
        st.integers(0, 4),  # slot
        st.lists(
            st.tuples(st.integers(-1, 3), st.sampled_from(["delivered", "deferred", "bounced"])),
            max_size=3,
        ),
        time_steps,
        st.integers(1, 3),  # commands in this entry
    ),
    min_size=1,
    max_size=25,
)


def _build_entries(plan: list[Slot], steps: list[Any], junk: bytes) -> list[bytes]:
    """Turn drawn ops into encoded entries, honouring ingress's order (chunks before Enqueue)."""
    now = T0
    entries: list[bytes] = []
    batch: list[Command] = []
    enqueued: set[str] = set()
    for kind, slot_i, results, step, batch_size in steps:
        now += step
        slot = plan[slot_i % len(plan)]
        cmds: list[Command] = []
        if kind == "put" and slot.chunk_bytes and slot.queue_id not in enqueued:
            cmds = list(slot.puts(now))
        elif kind == "enq":
            enqueued.add(slot.queue_id)
            cmds = [slot.enqueue(now)]
        elif kind == "out":
            results_t = tuple((i, o, o) for i, o in results)
            cmds = [RecordOutcome(slot.queue_id, now, results_t, now, 0, "", b"")]
        elif kind in ("hold", "rel"):
            cmds = [QueueOp("hold" if kind == "hold" else "release", (slot.queue_id,), now)]
        elif kind == "claim":  # epoch 0: no lease renewed in these transcripts
            cmds = [Claim((slot.queue_id,), "n1", 0)]
        elif kind == "ann":
            cmds = [Announce(f"n{slot_i}:7001", f"n{slot_i}", "s:1", "a:1", now - T0)]
        elif kind == "junk":
            entries.append(junk)
        batch.extend(cmds)
        if batch and len(batch) >= batch_size:
            entries.append(encode_entry(batch))
            batch = []
    if batch:
        entries.append(encode_entry(batch))
    return entries


def _run(store: QueueStore, entries: list[bytes], commit_every: int) -> list[Any]:
    machine = QueueStateMachine()
    out: list[Any] = []
    for index, entry in enumerate(entries, start=1):
        out.append(machine.apply(index, entry, store.apply_txn()))
        if index % commit_every == 0:
            store.commit_apply()
    store.commit_apply()
    return out


def _check_invariants(store: QueueStore) -> None:
    msgs = store.list_messages(1000)
    with store.reader() as r:  # what the memo holds is what the records decode to
        for m in msgs:
            raw = bytes(r._txn.get(m.queue_id.encode(), db=store._msgs))
            held = store.memo.get(m.queue_id, raw)
            assert held is None or held == _decode_message(raw, m.queue_id)
    counts = {s.value: 0 for s in MessageState}
    for m in msgs:
        counts[m.state().value] += 1
        assert not m.complete, m
        assert hashlib.sha256(store.read_body(m)).digest() == m.body_sha256
    assert store.counts() == counts
    due = sorted(_U64.pack(m.next_attempt_ms) + m.queue_id.encode() for m in msgs if not m.hold)
    assert _keys(store, "due") == due
    by_domain = sorted(
        {
            r.address.rpartition("@")[2].lower().encode()
            + b"\0"
            + _U64.pack(2**64 - 1 if m.hold else m.next_attempt_ms)
            + m.queue_id.encode()
            for m in msgs
            for r in m.recipients
            if r.state is RcptState.PENDING
        }
    )
    assert _keys(store, "due_by_domain") == by_domain


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots, ops, st.binary(max_size=20), st.integers(1, 4))
def test_random_transcripts_are_deterministic(
    plan: list[Slot], steps: list[Any], junk_tail: bytes, commit_every: int
) -> None:
    entries = _build_entries(plan, steps, b"\x01\xc1" + junk_tail)
    with fresh_store() as a, fresh_store() as b, fresh_store() as c:
        results_a = _run(a, entries, commit_every=1)
        results_b = _run(b, entries, commit_every=commit_every)  # group commit changes nothing
        assert results_a == results_b
        assert dump(a) == dump(b)
        c.memo = RecordMemo(max_bytes=0)  # every record decoded: the memo changes nothing
        assert _run(c, entries, commit_every=commit_every) == results_a
        assert dump(c) == dump(a)
        assert a.applied_index() == len(entries)
        _check_invariants(a)
        # Replaying the whole journal (restart) is a no-op.
        before = dump(a)
        assert _run(a, entries, commit_every=2) == [None] * len(entries)
        assert dump(a) == before


def test_one_attempt_split_over_several_outcomes_counts_once(
    tx: Transcript, store: QueueStore
) -> None:
    """The dispatcher splits big result lists into several commands; attempts stay per attempt."""
    tx.one(enqueue("Q1", rcpts=("a@x.org", "b@x.org", "c@x.org")))
    next_ms = T0 + 300_000
    tx.one(outcome("Q1", [(0, "deferred", "451 a")], T0, next_ms))
    tx.one(outcome("Q1", [(1, "deferred", "451 b"), (2, "delivered", "250 ok")], T0, next_ms))
    msg = store.get_message("Q1")
    assert msg is not None
    assert msg.attempts == 1
    assert [r.attempts for r in msg.recipients] == [1, 1, 1]


def test_unknown_outcome_value_is_ignored(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", rcpts=("a@x.org",)))
    tx.one(outcome("Q1", [(0, "exploded", "???")]))
    msg = store.get_message("Q1")
    assert msg is not None
    assert msg.recipients[0].state is RcptState.PENDING and msg.recipients[0].attempts == 0


# -- dispatch fencing: lease, claims, stale outcomes, bounces ------------------------------


def _renew(epoch: int, node: str = "n1") -> LeaseRenew:
    return LeaseRenew(node, f"{node}:7001", epoch, 3000)


def test_lease_epochs_only_move_forward(tx: Transcript) -> None:
    assert tx.one(_renew(3)) == ("ok", "")
    assert tx.one(_renew(3)) == ("ok", "")
    assert tx.one(_renew(2, "n2"))[0] == "rejected"
    assert tx.one(_renew(4, "n2")) == ("ok", "")


def test_claims_are_fenced_by_the_lease_epoch(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    tx.one(enqueue("Q2", idem=b"other"))
    tx.one(_renew(3))
    assert tx.one(Claim(("Q1", "Q2", "NOPE"), "n1", 3)) == ("ok", "Q1,Q2")
    assert tx.one(Claim(("Q1",), "n1", 2))[0] == "rejected"  # not the current epoch
    msg = store.get_message("Q1")
    assert msg is not None and (msg.claim_epoch, msg.claim_node) == (3, "n1")
    # A new leader (epoch 5) takes over claims of the ended epoch 3.
    tx.one(_renew(5, "n2"))
    assert tx.one(Claim(("Q1",), "n1", 3))[0] == "rejected"
    assert tx.one(Claim(("Q1",), "n2", 5)) == ("ok", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None and (msg.claim_epoch, msg.claim_node) == (5, "n2")


def test_outcome_from_a_stale_epoch_is_rejected(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    tx.one(_renew(3))
    tx.one(Claim(("Q1",), "n1", 3))
    tx.one(_renew(4, "n2"))
    assert tx.one(outcome("Q1", [(0, "delivered", "250 ok")], epoch=3))[0] == "rejected"
    assert store.get_message("Q1") is not None
    assert tx.one(outcome("Q1", [(0, "deferred", "451 x")], epoch=4)) == ("ok", "pending")
    msg = store.get_message("Q1")
    assert msg is not None and msg.claim_epoch == 0  # released for the next attempt


def test_bounce_is_queued_with_the_outcome(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    dsn = b"Message-ID: <Q1.dsn@host>\r\nSubject: Undelivered\r\n\r\nsorry\r\n"
    tx.one(outcome("Q1", [(0, "bounced", "550 5.1.1 no")], dsn=("D1", dsn)))
    assert store.get_message("Q1") is None  # final: deleted
    bounce = store.get_message("D1")
    assert bounce is not None
    assert bounce.mail_from == "" and [r.address for r in bounce.recipients] == [
        "sender@example.com"
    ]
    assert store.read_body(bounce) == dsn and bounce.message_id == "<Q1.dsn@host>"


def test_no_bounce_for_a_bounce(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1", mail_from=""))
    tx.one(outcome("Q1", [(0, "bounced", "550 no")], dsn=("D1", b"Subject: x\r\n\r\ny")))
    assert store.get_message("D1") is None


def test_queue_operations(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("Q1"))
    tx.one(enqueue("Q2", idem=b"two"))
    assert tx.one(QueueOp("hold", ("Q1", "NOPE"), T0 + 5)) == ("ok", "Q1")
    assert tx.one(QueueOp("hold", ("Q1",), T0 + 5)) == ("ok", "")  # already held
    assert store.counts()["hold"] == 1 and store.due_messages(T0 + 10**9, 10)[0].queue_id == "Q2"
    assert tx.one(QueueOp("release", ("Q1",), T0 + 7)) == ("ok", "Q1")
    msg = store.get_message("Q1")
    assert msg is not None and not msg.hold and msg.next_attempt_ms == T0 + 7
    tx.one(outcome("Q2", [(0, "deferred", "451")], T0, T0 + 10**6))
    assert tx.one(QueueOp("retry", ("Q2",), T0 + 9)) == ("ok", "Q2")
    msg = store.get_message("Q2")
    assert msg is not None and msg.next_attempt_ms == T0 + 9
    assert tx.one(QueueOp("delete", ("Q1", "Q2"), T0)) == ("ok", "Q1,Q2")
    assert store.list_messages(10) == [] and store.counts() == NO_COUNTS
    assert tx.one(QueueOp("explode", ("Q1",), T0))[0] == "rejected"


def test_iter_due_skips_in_flight_ids_and_stops_when_closed(
    tx: Transcript, store: QueueStore
) -> None:
    for i, qid in enumerate(("Q1", "Q2", "Q3", "Q4")):
        tx.apply(enqueue(qid, T0 + i, ("a@example.com",), b"x\r\n", idem=qid.encode()))
    due = store.iter_due(T0 + 10, 3, skip={"Q1", "Q3"})
    assert [m.queue_id for m in due] == ["Q2", "Q4"]  # skipped ones do not count to the limit
    assert [m.queue_id for m in store.iter_due(T0 + 10, 2)] == ["Q1", "Q2"]
    # The dispatcher closes it half-way: the read transaction and the lock are let go.
    gen = store.iter_due(T0 + 10, 10)
    assert next(gen).queue_id == "Q1"
    gen.close()
    tx.apply(enqueue("Q5", T0 + 5, ("a@example.com",), b"x\r\n", idem=b"Q5"))
    assert [m.queue_id for m in store.due_messages(T0 + 10, 10)][-1] == "Q5"


_BASE = queued_message(
    "Q1",
    ("a@x.org", Recipient("b@y.org", attempts=1)),
    mail_from="s@x.org",
    attempts=1,
    next_attempt_ms=T0,
)


@pytest.mark.parametrize(
    "changes",
    [
        {"claim_epoch": 3, "claim_node": "n2"},  # a claim: the record alone is rewritten
        {"recipients": (Recipient("a@x.org", RcptState.DELIVERED, 1), _BASE.recipients[1])},
        {"recipients": (Recipient("a@x.org"), Recipient("b@y.org", attempts=1))},  # equal, new
        {"next_attempt_ms": T0 + 5},
        {"hold": True},
        {"attempts": 0},
    ],
    ids=["claim", "recipient-done", "equal-recipients", "due-later", "hold", "attempts"],
)
def test_a_replaced_message_has_the_indexes_and_counts_of_one_put_fresh(
    changes: dict[str, Any],
) -> None:
    # put_message(new, old) writes only what changed; the indexes and the state counts
    # must come out as if `new` had been put into an empty store.
    new = _BASE.with_changes(**changes)
    with fresh_store() as replaced, fresh_store() as fresh:
        for store, steps in ((replaced, [(_BASE, None), (new, _BASE)]), (fresh, [(new, None)])):
            txn = store.apply_txn()
            for msg, old in steps:
                txn.put_message(msg, old)
            store.commit_apply()
        assert _without_meta(replaced) == _without_meta(fresh)
        assert replaced.counts() == fresh.counts()
