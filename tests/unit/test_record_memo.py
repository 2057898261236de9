"""RecordMemo: a message handed back only for the exact bytes it was held with."""

from __future__ import annotations

import pytest

from mqnode.errors import CorruptDataError
from mqnode.spool.record_memo import RecordMemo
from mqnode.spool.store import QueueStore
from mqnode.storage import pack, with_crc

from .kit import T0, Transcript, enqueue, queued_message


def _record(msg_id: str, pad: int = 0) -> bytes:
    return with_crc(pack(queued_message(msg_id, client="x" * pad).to_record()))


def test_only_the_same_bytes_get_the_message() -> None:
    memo = RecordMemo()
    msg = queued_message("Q1")
    record = _record("Q1")
    memo.put("Q1", record, msg)
    assert memo.get("Q1", record) is msg
    assert memo.get("Q1", record[:-1] + b"\0") is None
    assert memo.get("Q2", record) is None
    memo.drop("Q1")
    assert memo.get("Q1", record) is None


def test_bounded_by_count_oldest_out_first() -> None:
    memo = RecordMemo(max_records=2)
    for i in range(4):
        memo.put(f"Q{i}", _record(f"Q{i}"), queued_message(f"Q{i}"))
    assert len(memo) == 2
    assert memo.get("Q1", _record("Q1")) is None
    assert memo.get("Q3", _record("Q3")) is not None


def test_bounded_by_the_bytes_of_its_records_oldest_out_first() -> None:
    size = len(_record("Q0"))
    memo = RecordMemo(max_bytes=3 * size)
    for i in range(5):
        memo.put(f"Q{i}", _record(f"Q{i}"), queued_message(f"Q{i}"))
    assert len(memo) == 3
    assert memo.get("Q1", _record("Q1")) is None
    assert memo.get("Q4", _record("Q4")) is not None
    memo.put("Q9", _record("Q9", pad=10 * size), queued_message("Q9"))  # larger than it all
    assert memo.get("Q9", _record("Q9", pad=10 * size)) is None
    assert len(memo) == 3


def _lmdb_put(store: QueueStore, queue_id: str, raw: bytes) -> None:
    with store._env.begin(write=True) as txn:
        txn.put(queue_id.encode(), raw, db=store._msgs)


def test_a_changed_record_is_decoded_and_checked(tx: Transcript, store: QueueStore) -> None:
    tx.apply(enqueue("Q1", T0, ("a@x.org",), b"body"))
    held = store.get_message("Q1")
    assert held is not None and store.get_message("Q1") is held  # decoded once
    with store.reader() as r:
        raw = bytes(r._txn.get(b"Q1", db=store._msgs))
    _lmdb_put(store, "Q1", raw[:-1] + bytes([raw[-1] ^ 1]))  # a flipped bit on disk
    with pytest.raises(CorruptDataError):
        store.get_message("Q1")
    other = with_crc(pack(held.with_changes(attempts=7).to_record()))
    _lmdb_put(store, "Q1", other)
    again = store.get_message("Q1")
    assert again is not None and again.attempts == 7


def test_an_aborted_write_is_not_read_back(tx: Transcript, store: QueueStore) -> None:
    tx.apply(enqueue("Q1", T0, ("a@x.org",), b"body"))
    committed = store.get_message("Q1")
    assert committed is not None
    held = committed.with_changes(hold=True)
    store.apply_txn().put_message(held, committed)
    assert store.memo.get("Q1", with_crc(pack(held.to_record()))) is held
    store.abort_apply()
    assert store.get_message("Q1") == committed


def test_a_message_put_again_counts_once() -> None:
    size = len(_record("Q0"))
    memo = RecordMemo(max_bytes=3 * size)
    for _ in range(10):
        memo.put("Q0", _record("Q0"), queued_message("Q0"))
    memo.put("Q1", _record("Q1"), queued_message("Q1"))
    memo.put("Q2", _record("Q2"), queued_message("Q2"))
    assert len(memo) == 3  # Q0 counted once: nothing had to go
    assert memo.get("Q0", _record("Q0")) is not None
