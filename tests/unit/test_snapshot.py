"""Snapshot files: write from one store, install into another; damage is always detected."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from mqnode.errors import CorruptDataError
from mqnode.raft import snapshot_file
from mqnode.raft.snapshot_file import MAGIC, install, read_header, write_snapshot
from mqnode.spool.store import QueueStore

from .kit import T0, Transcript, chunked, dump, enqueue, open_store, outcome

LAST = (b"last-cmd", 7, 3)
PREV = (b"prev-cmd", 6, 3)
CLUSTER = ["127.0.0.1:7002", "127.0.0.1:7003"]


@pytest.fixture
def source(tmp_path: Path) -> Iterator[QueueStore]:
    """A store with inline, chunked, deferred and announced state, applied up to index 7."""
    store = open_store(tmp_path / "src")
    tx = Transcript(store)
    tx.one(enqueue("Q1", rcpts=("a@x.org", "b@x.org"), idem=b"k1"))
    puts, enq = chunked("Q2", bytes(range(256)) * 50, 4096)
    tx.apply(*puts)
    tx.one(enq)
    tx.one(outcome("Q1", [(0, "delivered", "250"), (1, "deferred", "451")], T0, T0 + 300_000))
    tx.one(enqueue("Q3", idem=b"k3"))
    tx.one(outcome("Q3", [(0, "delivered", "250")]))
    tx.apply(*chunked("U9", b"staged" * 10, 16)[0])
    tx.apply_raw(7, b"\x01\xc1")
    assert store.applied_index() == LAST[1]
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[QueueStore]:
    store = open_store(tmp_path / "dst")
    Transcript(store).one(enqueue("OLD", idem=b"old"))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def snap(tmp_path: Path, source: QueueStore) -> Path:
    path = tmp_path / "snapshot.bin"
    write_snapshot(path, source, LAST, PREV, CLUSTER)
    return path


def test_install_reproduces_the_state(snap: Path, source: QueueStore, target: QueueStore) -> None:
    header = install(snap, target)
    assert (header.last, header.prev, header.cluster) == (LAST, PREV, CLUSTER)
    assert header.index == 7
    assert dump(target) == dump(source)
    assert target.get_message("OLD") is None  # replaced, not merged
    assert target.applied_index() == 7
    assert target.counts() == source.counts()
    for msg in source.list_messages(10):
        assert target.read_body(msg) == source.read_body(msg)


def test_installed_store_keeps_working(snap: Path, target: QueueStore) -> None:
    install(snap, target)
    tx = Transcript(target)
    assert tx.apply_raw(7, b"\x01\xc1") is None  # already applied
    assert tx.apply_raw(8, b"") is not None
    assert tx.one(enqueue("Q9", idem=b"k1")) == ("duplicate", "Q1")
    assert tx.one(outcome("Q1", [(1, "delivered", "250")])) == ("ok", "complete")


def test_header_round_trip(snap: Path) -> None:
    header = read_header(snap)
    assert header.data_offset + header.state_size == snap.stat().st_size
    assert snap.read_bytes()[:8] == MAGIC


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_every_flipped_header_byte_is_detected(snap: Path, target: QueueStore) -> None:
    before = dump(target)
    original = snap.read_bytes()
    data_offset = read_header(snap).data_offset
    for offset in range(data_offset):
        snap.write_bytes(original)
        _flip(snap, offset)
        with pytest.raises(CorruptDataError):
            install(snap, target)
    assert dump(target) == before


@pytest.mark.parametrize("where", [0.0, 0.1, 0.37, 0.5, 0.83, 1.0])
def test_flipped_state_byte_is_detected(snap: Path, target: QueueStore, where: float) -> None:
    before = dump(target)
    header = read_header(snap)
    offset = header.data_offset + min(int(header.state_size * where), header.state_size - 1)
    _flip(snap, offset)
    read_header(snap)  # the header alone is still fine
    with pytest.raises(CorruptDataError, match="state damaged"):
        install(snap, target)
    assert dump(target) == before
    assert not snap.with_name(snap.name + ".state").exists()


@pytest.mark.parametrize("cut", ["empty", "magic", "header-len", "mid-header", "no-state", "-1"])
def test_truncated_file_is_detected(snap: Path, target: QueueStore, cut: str) -> None:
    before = dump(target)
    data = snap.read_bytes()
    data_offset = read_header(snap).data_offset
    keep = {
        "empty": 0,
        "magic": 8,
        "header-len": 14,
        "mid-header": data_offset - 3,
        "no-state": data_offset,
        "-1": len(data) - 1,
    }[cut]
    snap.write_bytes(data[:keep])
    with pytest.raises(CorruptDataError):
        install(snap, target)
    assert dump(target) == before


def test_extra_trailing_bytes_are_detected(snap: Path, target: QueueStore) -> None:
    with open(snap, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CorruptDataError):
        install(snap, target)


def test_missing_file_is_corrupt_data(tmp_path: Path, target: QueueStore) -> None:
    with pytest.raises(CorruptDataError):
        install(tmp_path / "nope.bin", target)


def test_a_snapshot_replaces_an_existing_file_and_leaves_no_scratch(
    tmp_path: Path, source: QueueStore
) -> None:
    """Reopening an existing file with "wb" truncates it, and ext4 (auto_da_alloc) then
    writes the whole copy back when it is closed: every journal fsync on the disk stalled
    100-150 ms at each snapshot. The old file is removed, and nothing else is written."""
    path = tmp_path / "snap" / "snapshot.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * 100_000)
    write_snapshot(path, source, LAST, PREV, CLUSTER)
    assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.bin"]
    assert read_header(path).index == LAST[1]


@pytest.mark.parametrize("size,crc", [(0, 0), (2**64 - 1, 2**32 - 1), (300 << 20, 127)])
@pytest.mark.parametrize("members", [1, 3, 200])
def test_every_header_fills_its_slot_exactly(size: int, crc: int, members: int) -> None:
    """The state is streamed in behind a slot reserved before its size and CRC are known."""
    cluster = [f"node-{i}.example.net:{7000 + i}" for i in range(members)]
    slot = snapshot_file._header_slot(LAST, PREV, cluster)
    assert len(snapshot_file._pack_header(LAST, PREV, cluster, size, crc, slot)) == slot


class _FakeStore:
    """Stands in for the state's copy: writes `chunks` MiB, then fails if told to."""

    def __init__(self, chunks: int, fail: bool) -> None:
        self.chunks, self.fail = chunks, fail

    def copy_into(self, fd: int, txn: object = None) -> None:
        for _ in range(self.chunks):
            os.write(fd, bytes(1 << 20))
        if self.fail:
            raise RuntimeError("MDB_PANIC")


def test_a_failed_copy_fails_the_snapshot(tmp_path: Path) -> None:
    store = cast(QueueStore, _FakeStore(3, fail=True))
    with pytest.raises(OSError, match="MDB_PANIC"):
        write_snapshot(tmp_path / "snapshot.bin", store, LAST, PREV, CLUSTER)


def test_a_failed_write_ends_the_copy_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy blocks on a full pipe once nobody reads it: closing the pipe ends it."""

    def broken(src: object, out: object) -> tuple[int, int]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot_file, "_copy_synced", broken)
    store = cast(QueueStore, _FakeStore(64, fail=False))
    with pytest.raises(OSError, match="No space"):
        write_snapshot(tmp_path / "snapshot.bin", store, LAST, PREV, CLUSTER)
    assert not any(t.name == "snapshot-copy" for t in threading.enumerate())
