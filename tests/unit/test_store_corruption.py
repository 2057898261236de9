"""Damaged queue-store files are reported as CorruptDataError, never applied or crashed on."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import pytest

from mqnode.errors import CorruptDataError
from mqnode.spool.store import QueueStore
from mqnode.storage import open_env

from .kit import Transcript, enqueue, open_store


def _filled(path: Path, n: int = 200) -> None:
    store = open_store(path)
    tx = Transcript(store)
    for i in range(n):
        tx.one(enqueue(f"Q{i:04d}", body=b"x" * 2000))
    store.close()


def test_truncated_state_file_is_refused_not_a_bus_error(tmp_path: Path) -> None:
    path = tmp_path / "state"
    _filled(path)
    data = path / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 3)
    with pytest.raises(CorruptDataError, match="truncated"):
        QueueStore(path, 64)


def test_flipped_byte_in_a_message_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "state"
    _filled(path, n=3)
    env = lmdb.open(str(path), max_dbs=16)
    msgs = env.open_db(b"msgs")
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(b"Q0001", db=msgs))
        raw[len(raw) // 2] ^= 0x40
        txn.put(b"Q0001", bytes(raw), db=msgs)
    env.close()
    store = QueueStore(path, 64)
    try:
        assert store.get_message("Q0000") is not None
        with pytest.raises(CorruptDataError, match="Q0001"):
            store.get_message("Q0001")
    finally:
        store.close()


def test_flipped_byte_in_a_body_chunk_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "state"
    _filled(path, n=1)
    env = lmdb.open(str(path), max_dbs=16)
    body = env.open_db(b"body")
    with env.begin(write=True) as txn:
        key, raw = next(iter(txn.cursor(db=body)))
        damaged = bytearray(raw)
        damaged[-1] ^= 0x01
        txn.put(key, bytes(damaged), db=body)
    env.close()
    store = QueueStore(path, 64)
    try:
        msg = store.get_message("Q0000")
        assert msg is not None
        with pytest.raises(CorruptDataError, match="chunk"):
            store.read_body(msg)
    finally:
        store.close()


def test_a_free_tail_past_the_end_of_the_file_is_not_truncation(tmp_path: Path) -> None:
    """Pages a transaction allocated and freed again are counted, never written: here
    the third transaction takes pages at the end of the file and frees them again. A
    node's state does this when one apply enqueues and deletes many messages."""
    path = tmp_path / "env"
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=4, sync=False)
    db = env.open_db(b"x")
    with env.begin(write=True) as txn:
        txn.put(b"a", b"1", db=db)
    env.stat()
    with env.begin(write=True) as txn:
        txn.put(b"big", b"x" * 300_000, db=db)
        txn.delete(b"big", db=db)
    env.stat()
    with env.begin(write=True) as txn:
        for i in range(2000):
            txn.put(b"k%d" % i, b"v" * 100, db=db)
        for i in range(2000):
            txn.delete(b"k%d" % i, db=db)
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    env.close()
    assert os.path.getsize(path / "data.mdb") < needed  # what LMDB leaves
    env = open_env(path, 64 << 20, 4, "test env")
    with env.begin() as txn:
        assert txn.get(b"a", db=env.open_db(b"x", txn=txn)) == b"1"
    env.close()
    assert os.path.getsize(path / "data.mdb") == needed  # the free tail, now covered
