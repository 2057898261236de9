"""State commits skip fsync; a state from an earlier boot with unsynced commits is rebuilt.

spool/store.py: the queue state is derived from the log, so its commits are not
fsynced. A process killed loses nothing (its writes are in the kernel's page
cache); a kernel crash may lose or tear them, which the boot-id marker tells
apart at the next open. These tests kill real processes (`os._exit` in a
child, no cleanup) and fake the reboot by giving the store another boot id.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from mqnode.errors import CorruptDataError, MqnodeError
from mqnode.node import watch_state_writeback
from mqnode.spool.store import UNSYNCED_MARKER, WRITEBACK_FAILED, QueueStore
from tests.support.chaos import tear_unsynced_state

from .kit import Transcript, enqueue, open_store, outcome
from .raftkit import single_node

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def _store(path: Path, boot: str | None) -> QueueStore:
    return QueueStore(path, 64, boot_id=lambda: boot)


def _killed_after_commit(path: Path, ids: list[str], boot: str) -> None:
    """A child process applies and commits `ids`, then dies without closing the store."""
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from mqnode.spool.store import QueueStore
        from tests.unit.kit import Transcript, enqueue
        store = QueueStore(Path({str(path)!r}), 64, boot_id=lambda: {boot!r})
        tx = Transcript(store)
        for qid in {ids!r}:
            tx.one(enqueue(qid))
        os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, timeout=60)
    assert proc.returncode == 9


def test_without_a_boot_id_every_commit_is_synced_and_no_marker_is_left(tmp_path: Path) -> None:
    store = _store(tmp_path / "state", None)
    Transcript(store).one(enqueue("Q1"))
    assert not store.unsynced
    assert not (tmp_path / "state" / UNSYNCED_MARKER).exists()
    store.close()


def test_a_killed_process_loses_nothing_under_the_same_boot(tmp_path: Path) -> None:
    path = tmp_path / "state"
    _killed_after_commit(path, ["Q1", "Q2", "Q3"], "boot-a")
    assert (path / UNSYNCED_MARKER).read_text().strip() == "boot-a"
    store = _store(path, "boot-a")
    try:
        assert not store.discarded_unsynced
        assert all(store.get_message(q) is not None for q in ("Q1", "Q2", "Q3"))
        assert store.applied_index() == 3
    finally:
        store.close()


def test_after_a_reboot_unsynced_commits_are_discarded_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state"
    _killed_after_commit(path, ["Q1", "Q2"], "boot-a")
    store = _store(path, "boot-b")
    try:
        assert store.discarded_unsynced
        assert store.applied_index() == 0 and store.get_message("Q1") is None
        # The new marker names this boot, before any commit of its own.
        assert (path / UNSYNCED_MARKER).read_text().strip() == "boot-b"
    finally:
        store.close()
    assert "restarted since (boot boot-b): discarding it" in caplog.text


def test_a_clean_close_syncs_so_a_reboot_keeps_the_state(tmp_path: Path) -> None:
    path = tmp_path / "state"
    store = _store(path, "boot-a")
    Transcript(store).one(enqueue("Q1"))
    store.close()
    store.close()  # idempotent
    assert not (path / UNSYNCED_MARKER).exists()
    store = _store(path, "boot-b")
    try:
        assert not store.discarded_unsynced
        assert store.get_message("Q1") is not None
    finally:
        store.close()


class _DiskRefusesWriteback:
    """The state's LMDB env, whose fsync reports EIO as a failed writeback makes it do.

    A real failed writeback needs a failing block device (dm-error, root); what is
    tested here is what the store and the node do with the error it causes.
    """

    def __init__(self, env: object) -> None:
        self._env = env
        self.syncs = 0

    def sync(self, force: bool = False) -> None:
        self.syncs += 1
        raise lmdb.Error("mdb_env_sync: Input/output error")

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def test_a_failed_writeback_stops_the_node_and_the_state_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """W27: a failed writeback surfaces at the next periodic sync; the marker then matches
    no boot, close() neither syncs nor removes it, and the next open (same boot) discards
    the state for a rebuild. Before, nothing fsynced the state while the node ran, so the
    kernel's error went unseen and the pages it could not write read back stale once
    evicted."""
    path = tmp_path / "state"
    store = _store(path, "boot-a")
    Transcript(store).one(enqueue("Q1"))
    store.sync_state()  # a healthy disk: nothing happens
    failing = store._env = _DiskRefusesWriteback(store._env)
    failures: list[MqnodeError] = []

    async def watch() -> None:
        await asyncio.wait_for(watch_state_writeback(store.sync_state, 0.01, failures.append), 10)

    asyncio.run(watch())  # returns after the first failure
    assert len(failures) == 1 and isinstance(failures[0], CorruptDataError), failures
    assert "writing its commits back to disk failed" in str(failures[0])
    assert (path / UNSYNCED_MARKER).read_text().strip() == WRITEBACK_FAILED
    store.close()
    assert failing.syncs == 1, "close() synced an untrusted state"
    assert (path / UNSYNCED_MARKER).read_text().strip() == WRITEBACK_FAILED
    store = _store(path, "boot-a")
    try:
        assert store.discarded_unsynced
        assert store.get_message("Q1") is None and store.applied_index() == 0
    finally:
        store.close()
    assert "a writeback of its commits failed before the node stopped" in caplog.text


def test_a_writeback_failing_at_close_leaves_the_state_marked_for_a_rebuild(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state"
    store = _store(path, "boot-a")
    Transcript(store).one(enqueue("Q1"))
    store._env = _DiskRefusesWriteback(store._env)
    store.close()
    assert (path / UNSYNCED_MARKER).read_text().strip() == WRITEBACK_FAILED
    reopened = _store(path, "boot-a")
    try:
        assert reopened.discarded_unsynced
    finally:
        reopened.close()


def _raft_child(tmp_path: Path, first: list[str], second: list[str]) -> str:
    """A child runs one RaftNode: `first` applied, a snapshot, `second` applied; killed."""
    return textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        from mqnode.spool.commands import encode_entry
        from tests.unit.kit import enqueue
        from tests.unit.raftkit import single_node

        async def submit(raft, ids):
            for qid in ids:
                raft.submit_entry(encode_entry([enqueue(qid)]), lambda *_: None)
            for _ in range(600):
                if all(raft._store.get_message(q) is not None for q in ids):
                    return
                await asyncio.sleep(0.05)
            raise SystemExit("not applied")

        async def main():
            async with single_node(Path({str(tmp_path)!r})) as (raft, _):
                print(raft._settings.self_addr, flush=True)
                await submit(raft, {first!r})
                raft.force_compaction()
                snap = Path({str(tmp_path)!r}) / "snapshot.bin"
                for _ in range(600):
                    if snap.exists() and raft._journal[0][1] > 1:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise SystemExit("no snapshot")
                await submit(raft, {second!r})
                os._exit(9)

        asyncio.run(main())
        """
    )


def test_a_node_rebuilds_a_discarded_state_from_snapshot_and_journal(tmp_path: Path) -> None:
    first = [f"A{i:02d}" for i in range(20)]
    second = [f"B{i:02d}" for i in range(20)]
    proc = subprocess.run(
        [sys.executable, "-c", _raft_child(tmp_path, first, second)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=90,
    )
    assert proc.returncode == 9, proc.stderr[-3000:]
    addr = proc.stdout.split()[0]
    assert tear_unsynced_state(tmp_path / "state", random.Random(7))

    async def restarted() -> None:
        async with single_node(tmp_path, addr=addr) as (raft, _):
            store = raft._store
            assert store.discarded_unsynced
            for _ in range(200):
                if all(store.get_message(q) is not None for q in first + second):
                    break
                await asyncio.sleep(0.05)
            missing = [q for q in first + second if store.get_message(q) is None]
            assert missing == []
            assert sum(store.counts().values()) == len(first) + len(second)

    asyncio.run(restarted())


def test_the_state_is_written_back_once_enough_bodies_were_applied() -> None:
    """Not only every interval: a sync of what 10 s of 100 KiB mail dirtied held the disk
    long enough that the journal's fsyncs waited 250 ms behind it."""
    written = [0]
    syncs: list[int] = []

    async def run() -> None:
        watcher = asyncio.create_task(
            watch_state_writeback(
                lambda: syncs.append(written[0]), 3600, lambda e: None, lambda: written[0], 1000
            )
        )
        await asyncio.sleep(0.6)
        assert syncs == [], "nothing written, the interval far away"
        written[0] = 999
        await asyncio.sleep(0.6)
        assert syncs == []
        written[0] = 1000
        for _ in range(40):
            await asyncio.sleep(0.05)
            if syncs:
                break
        assert syncs == [1000]
        watcher.cancel()

    asyncio.run(run())


def test_bodies_held_count_what_is_applied_less_what_is_deleted(tmp_path: Path) -> None:
    """The writeback trigger counts bodies still held: delivered mail frees its pages for
    the next, and a sync every 16 MiB applied wrote each 100 KiB body once more."""
    store = open_store(tmp_path / "state")
    try:
        tx = Transcript(store)
        body = b"Subject: x\r\n\r\n" + b"y" * 100_000
        tx.one(enqueue("Q1", body=body, idem=b"k1"))
        tx.one(enqueue("Q2", body=body, idem=b"k2"))
        assert store.body_bytes_held == 2 * len(body)
        tx.one(outcome("Q1", [(0, "delivered", "250")]))
        assert store.body_bytes_held == len(body)
    finally:
        store.close()
