"""SnapshotWriter: log-compaction snapshots written on a thread of their own.

Writing a snapshot copies the whole LMDB state (every queued body). On the
tick thread that stopped heartbeats for as long as the copy took: with a few
hundred MB queued, seconds, and every node compacts at about the same log
length, so the leader lost its followers and the cluster went through an
election per compaction (terms 1 -> 17 in 50 s of 100 KiB submissions,
refusing mail with 451 each time).

Now the tick thread only commits the state and opens an LMDB read
transaction at exactly the snapshot's index (`StateStore.snapshot_txn`);
this writer copies from it on its own thread while applies go on, into
`snapshot.bin.writing`. pysyncobj polls `status()` (its `serializeChecker`)
on the tick thread; the finished file is renamed over `snapshot.bin` there,
and only then does pysyncobj drop the log entries it covers. Renames of
`snapshot.bin` therefore all happen on the tick thread: ours here, and
pysyncobj's when a snapshot downloaded from the leader is installed, which
`discard()`s a copy still being written.

Promises: `snapshot.bin` is always a complete, fsynced snapshot (or absent);
at most one copy runs at a time; a failed copy is logged and reported as
FAILED (pysyncobj keeps the log and tries again later).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pysyncobj.config import SERIALIZER_STATE

from mqnode.raft import snapshot_file
from mqnode.raft.contracts import StateStore
from mqnode.raft.journal import Entry
from mqnode.storage import fsync_path

log = logging.getLogger("mqnode.raft")

WRITING_SUFFIX = ".writing"
RETIRED_SUFFIX = ".retired"
# The replaced snapshot is given back to the filesystem this much at a time. Freed in one
# go (the rename over it), ext4 mounted with `discard` trimmed all its blocks inside the
# next journal commit: the rename's directory fsync took 120-170 ms with 300-500 MB
# snapshots, on the tick thread, and every journal fsync on the disk waited as long.
RELEASE_STEP_BYTES = 32 << 20
RELEASE_PAUSE_S = 0.05
# pysyncobj may still be sending the replaced file to a lagging follower (it keeps it
# open between chunks): it is only shrunk once nothing in this process has it open.
RELEASE_WAIT_S = 600.0


class SnapshotWriter:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._writing = path.with_name(path.name + WRITING_SUFFIX)
        self._thread: threading.Thread | None = None
        self._outcome: tuple[bool, int, float] | None = None  # ok, index, seconds
        self._discarded = False
        self._retired = path.with_name(path.name + RETIRED_SUFFIX)
        self._writing.unlink(missing_ok=True)  # left by a crash mid-copy
        self._retired.unlink(missing_ok=True)  # left by a crash while it was released
        self._releasing: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    @property
    def copying(self) -> bool:
        """A copy thread is running, so its read transaction on the store is open."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self, store: StateStore[Any], last: Entry, prev: Entry, members: list[str]) -> None:
        """Tick thread: freeze the state at last[1] and copy it in the background."""
        if self._thread is not None:
            raise RuntimeError("a snapshot is already being written")
        txn = store.snapshot_txn()
        self._outcome, self._discarded = None, False
        self._thread = threading.Thread(
            target=self._write,
            args=(store, txn, last, prev, members),
            name="snapshot-writer",
            daemon=True,
        )
        self._thread.start()

    def _write(
        self, store: StateStore[Any], txn: Any, last: Entry, prev: Entry, members: list[str]
    ) -> None:
        started = time.monotonic()
        ok = False
        try:
            snapshot_file.write_snapshot(self._writing, store, last, prev, members, txn)
            ok = True
        except Exception:
            log.exception("snapshot at index %d failed; the log is kept", last[1])
        finally:
            txn.abort()
        self._outcome = (ok, int(last[1]), time.monotonic() - started)

    def status(self) -> int:
        """Tick thread (pysyncobj's serializeChecker): SERIALIZING, then the result once."""
        thread = self._thread
        if thread is None:
            return int(SERIALIZER_STATE.NOT_SERIALIZING)
        if thread.is_alive():
            return int(SERIALIZER_STATE.SERIALIZING)
        thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if outcome is None or not outcome[0] or self._discarded:
            # FAILED, not NOT_SERIALIZING: pysyncobj resets its own state only on a result.
            self._writing.unlink(missing_ok=True)
            if self._discarded and outcome is not None:
                log.info(
                    "snapshot at index %d dropped: the leader's snapshot replaced it", outcome[1]
                )
            return int(SERIALIZER_STATE.FAILED)
        _, index, seconds = outcome
        try:
            retired = self._retire_current()
            os.replace(self._writing, self._path)
            fsync_path(self._path.parent)
            if retired:
                self._releasing = threading.Thread(
                    target=release_gradually,
                    args=(self._retired,),
                    name="snapshot-release",
                    daemon=True,
                )
                self._releasing.start()
        except OSError:
            # Never raise here: pysyncobj would not hear a result and would stop
            # sending snapshots to lagging followers for good.
            log.exception("snapshot at index %d could not replace %s", index, self._path)
            return int(SERIALIZER_STATE.FAILED)
        log.info("snapshot written at index %d in %.2f s (in the background)", index, seconds)
        return int(SERIALIZER_STATE.SUCCESS)

    def _retire_current(self) -> bool:
        """Keep the snapshot about to be replaced as `.retired`, so that the rename frees
        none of its blocks; False when there is none or the last one is still released."""
        if self._releasing is not None and self._releasing.is_alive():
            return False
        self._retired.unlink(missing_ok=True)
        try:
            os.link(self._path, self._retired)
        except FileNotFoundError:
            return False
        return True

    def discard(self) -> None:
        """Tick thread: wait for a copy in progress; it will not replace snapshot.bin.

        Called when pysyncobj has just put the leader's snapshot in place and is
        installing it: our older copy must neither overwrite that file nor hold
        a read transaction on the store being replaced.
        """
        thread = self._thread
        if thread is None:
            return
        self._discarded = True
        thread.join()

    def close(self) -> None:
        """Wait for a copy in progress (its read transaction must end before the store closes)."""
        if self._thread is not None:
            self._thread.join()


def release_gradually(path: Path, wait_s: float = RELEASE_WAIT_S) -> None:
    """Shrink `path` by `RELEASE_STEP_BYTES` at a time, then remove it: each step's
    blocks are trimmed in a journal commit of their own (see RELEASE_STEP_BYTES). Not
    while this process has it open (pysyncobj sending it): then only after `wait_s`,
    and by removing it alone, which frees it once the last reader closes it."""
    try:
        deadline = time.monotonic() + wait_s
        while opened_here(path):
            if time.monotonic() >= deadline:
                path.unlink(missing_ok=True)
                return
            time.sleep(0.5)
        with open(path, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            while size > 0:
                size = max(0, size - RELEASE_STEP_BYTES)
                os.ftruncate(fh.fileno(), size)
                time.sleep(RELEASE_PAUSE_S)
        path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not release the replaced snapshot %s", path, exc_info=True)


def opened_here(path: Path) -> bool:
    """Whether a file descriptor of this process refers to `path`'s file (Linux /proc;
    elsewhere, or unreadable: True, and the file is only removed)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                st = os.stat(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                return True
    except OSError:
        return True
    return False
