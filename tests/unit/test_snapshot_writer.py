"""SnapshotWriter: the copy runs off the tick thread and shows the state at its index only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pysyncobj.config import SERIALIZER_STATE

from mqnode.raft import snapshot_writer
from mqnode.raft.snapshot_file import install, read_header
from mqnode.raft.snapshot_writer import SnapshotWriter
from mqnode.spool.store import QueueStore

from .kit import Transcript, enqueue, open_store

MEMBERS = ["127.0.0.1:7002", "127.0.0.1:7003"]


def wait_result(writer: SnapshotWriter, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = writer.status()
        if state != SERIALIZER_STATE.SERIALIZING:
            return state
        time.sleep(0.01)
    raise AssertionError("snapshot still being written")


def entry(index: int) -> tuple[bytes, int, int]:
    return (b"cmd", index, 1)


def test_copy_is_the_state_at_its_index_while_applies_go_on(
    tmp_path: Path, store: QueueStore
) -> None:
    tx = Transcript(store)
    for i in range(3):
        tx.one(enqueue(f"Q{i}", idem=f"k{i}".encode()))
    path = tmp_path / "snapshot.bin"
    writer = SnapshotWriter(path)
    writer.start(store, entry(3), entry(2), MEMBERS)
    # The tick thread goes on applying (and committing) while the copy runs.
    tx.one(enqueue("LATE", idem=b"late"))
    assert wait_result(writer) == SERIALIZER_STATE.SUCCESS
    assert writer.status() == SERIALIZER_STATE.NOT_SERIALIZING  # the result is given once
    assert not path.with_name("snapshot.bin.writing").exists()
    header = read_header(path)
    assert (header.index, header.cluster) == (3, MEMBERS)
    target = open_store(tmp_path / "dst")
    try:
        install(path, target)
        assert target.applied_index() == 3
        assert target.get_message("Q2") is not None and target.get_message("LATE") is None
    finally:
        target.close()


def test_discarded_copy_never_replaces_the_file(tmp_path: Path, store: QueueStore) -> None:
    Transcript(store).one(enqueue("Q1", idem=b"k1"))
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"the leader's snapshot, just installed")
    writer = SnapshotWriter(path)
    writer.start(store, entry(1), entry(0), MEMBERS)
    writer.discard()
    assert wait_result(writer) == SERIALIZER_STATE.FAILED  # pysyncobj needs a result
    assert path.read_bytes() == b"the leader's snapshot, just installed"
    assert not path.with_name("snapshot.bin.writing").exists()


def test_one_copy_at_a_time_and_leftovers_removed(tmp_path: Path, store: QueueStore) -> None:
    path = tmp_path / "snapshot.bin"
    leftover = path.with_name("snapshot.bin.writing")
    leftover.write_bytes(b"half a copy from before a crash")
    writer = SnapshotWriter(path)
    assert not leftover.exists()
    Transcript(store).one(enqueue("Q1", idem=b"k1"))
    writer.start(store, entry(1), entry(0), MEMBERS)
    with pytest.raises(RuntimeError):
        writer.start(store, entry(1), entry(0), MEMBERS)
    writer.close()
    assert wait_result(writer) == SERIALIZER_STATE.SUCCESS
    assert read_header(path).index == 1


def test_a_failed_copy_is_reported_and_keeps_the_old_file(
    tmp_path: Path, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    Transcript(store).one(enqueue("Q1", idem=b"k1"))
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"previous snapshot")

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("mqnode.raft.snapshot_file.write_snapshot", broken)
    writer = SnapshotWriter(path)
    writer.start(store, entry(1), entry(0), MEMBERS)
    assert wait_result(writer) == SERIALIZER_STATE.FAILED
    assert path.read_bytes() == b"previous snapshot"


def test_a_failed_rename_is_a_failure_not_an_exception(
    tmp_path: Path, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # status() runs inside pysyncobj's tick: raising there would leave it waiting forever.
    Transcript(store).one(enqueue("Q1", idem=b"k1"))
    writer = SnapshotWriter(tmp_path / "snapshot.bin")
    writer.start(store, entry(1), entry(0), MEMBERS)
    writer.close()

    def no_rename(*_args: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr("mqnode.raft.snapshot_writer.os.replace", no_rename)
    assert writer.status() == SERIALIZER_STATE.FAILED
    assert writer.status() == SERIALIZER_STATE.NOT_SERIALIZING


def _wait_gone(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists(), f"{path} still there"


def test_the_replaced_snapshot_is_released_a_step_at_a_time_not_while_it_is_read(
    tmp_path: Path, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename over the old snapshot frees nothing (it is kept as .retired); it is
    then shrunk a step at a time, once nothing here reads it (pysyncobj sending it to a
    follower keeps it open), and removed. A reader that opened it before the rename
    reads it whole."""
    monkeypatch.setattr("mqnode.raft.snapshot_writer.RELEASE_STEP_BYTES", 1 << 20)
    monkeypatch.setattr("mqnode.raft.snapshot_writer.RELEASE_PAUSE_S", 0.001)
    Transcript(store).one(enqueue("Q1", idem=b"k1"))
    path = tmp_path / "snapshot.bin"
    old = b"o" * (5 << 20)
    path.write_bytes(old)
    retired = path.with_name("snapshot.bin.retired")
    sizes: list[int] = []
    real_ftruncate = snapshot_writer.os.ftruncate

    def ftruncate(fd: int, size: int) -> None:
        sizes.append(size)
        real_ftruncate(fd, size)

    monkeypatch.setattr(snapshot_writer.os, "ftruncate", ftruncate)
    writer = SnapshotWriter(path)
    with open(path, "rb") as sending:  # pysyncobj streaming the old one
        writer.start(store, entry(1), entry(0), MEMBERS)
        assert wait_result(writer) == SERIALIZER_STATE.SUCCESS
        assert read_header(path).index == 1
        time.sleep(0.6)
        assert retired.exists() and not sizes, "shrunk while it was being read"
        assert sending.read() == old
    _wait_gone(retired)
    assert sizes == [4 << 20, 3 << 20, 2 << 20, 1 << 20, 0]


def test_a_leftover_retired_snapshot_is_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.bin"
    retired = path.with_name("snapshot.bin.retired")
    retired.write_bytes(b"released halfway before a crash")
    SnapshotWriter(path)
    assert not retired.exists()
