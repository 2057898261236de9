"""Snapshot files: a compacted LMDB copy of the queue state plus the Raft position.

pysyncobj calls our serializer at log compaction and ships the resulting file
to lagging followers (install snapshot); this module owns that file format:

    MAGIC (8) || header_len (u32 BE) || header_crc32 (u32 BE) || header (msgpack)
    || state (LMDB data.mdb)

header = {"last": [cmd, idx, term], "prev": [cmd, idx, term],
          "cluster": [addr, ...], "state_size", "state_crc32", "pad"}

"pad" (zero bytes, ignored on reading) makes the header exactly fill the slot
reserved for it before the state is streamed in behind it.

The CRC covers the state bytes; the header has its own CRC in front of it.
A file that fails either check raises `CorruptDataError` and is never applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from mqnode.errors import CorruptDataError
from mqnode.raft.contracts import StateStore
from mqnode.storage import crc32

MAGIC = b"MQSNAP01"
_U32 = struct.Struct(">I")
_COPY_BYTES = 1 << 20
# Room in the header slot for the "pad" field's name and length prefix (msgpack bin16).
_PAD_ROOM = 8
# Write back a snapshot in slices of this size. One fsync of a whole state copy
# (70 MB: ~50 ms of device time) queued every journal fsync behind it, the
# node's own and, on a shared disk, its peers': a 250 ms stall in acceptance
# at each compaction (bench latency row). Slices keep the wait to a few ms.
SYNC_BYTES = 4 << 20

Entry = tuple[bytes, int, int]


@dataclass(frozen=True)
class SnapshotHeader:
    last: Entry
    prev: Entry
    cluster: list[str]
    state_size: int
    state_crc32: int
    data_offset: int

    @property
    def index(self) -> int:
        return self.last[1]


def write_snapshot(
    dest: Path,
    store: StateStore[Any],
    last: Entry,
    prev: Entry,
    cluster: list[str],
    txn: Any = None,
) -> None:
    """Write a snapshot of `store` (applied up to last[1]) to `dest`, fsynced.

    `txn`: a read transaction from `store.snapshot_txn()` taken at last[1]
    (the background writer's case); without it the current state is copied.

    One pass: the LMDB copy streams through a pipe into `dest` behind a header slot,
    checksummed and synced in slices on the way, and the header is written into its
    slot last. Copying to a scratch file first and then into the snapshot cost twice
    the CPU and page cache; with a few hundred MB queued, three nodes' snapshots
    took most of two cores for seconds and acceptance's p99 rose tenfold.
    """
    slot = _header_slot(last, prev, cluster)
    # Removed, not truncated: reopening an existing file with "wb" truncates it, and ext4
    # (auto_da_alloc) then writes the data back when the file is closed, so the next
    # journal commit waited for the whole copy: every node's fsyncs on the disk stalled
    # 100-150 ms at each snapshot (bench latency, 100 KiB).
    dest.unlink(missing_ok=True)
    with open(dest, "xb") as out:
        out.write(bytes(16 + slot))
        crc, size = _stream_state(store, txn, out)  # flushed and synced
        header = _pack_header(last, prev, cluster, size, crc, slot)
        os.pwrite(out.fileno(), MAGIC + _U32.pack(slot) + _U32.pack(crc32(header)) + header, 0)
        os.fsync(out.fileno())


def _header_fields(
    last: Entry, prev: Entry, cluster: list[str], size: int, crc: int
) -> dict[str, Any]:
    return {
        "last": list(last),
        "prev": list(prev),
        "cluster": cluster,
        "state_size": size,
        "state_crc32": crc,
    }


def _header_slot(last: Entry, prev: Entry, cluster: list[str]) -> int:
    """Bytes reserved for the header before the state: room for any size and CRC, and
    for the padding that makes every header fill it exactly (`_pack_header`)."""
    fields = _header_fields(last, prev, cluster, 2**64 - 1, 2**32 - 1)
    widest = len(msgpack.packb(fields, use_bin_type=True))
    return widest + _PAD_ROOM


def _pack_header(
    last: Entry, prev: Entry, cluster: list[str], size: int, crc: int, slot: int
) -> bytes:
    """The header, padded to exactly `slot` bytes. Readers look fields up by name, so
    the "pad" field is ignored by every release."""
    fields = _header_fields(last, prev, cluster, size, crc)
    base = len(msgpack.packb(fields, use_bin_type=True))
    for pad in range(max(0, slot - base - _PAD_ROOM), slot - base + 1):
        packed: bytes = msgpack.packb({**fields, "pad": bytes(pad)}, use_bin_type=True)
        if len(packed) == slot:
            return packed
    raise AssertionError(f"no padding fills a {slot}-byte header slot")  # never: see _PAD_ROOM


def _stream_state(store: StateStore[Any], txn: Any, out: BinaryIO) -> tuple[int, int]:
    """Copy the state into `out` through a pipe; (crc32, bytes), synced in slices.

    The pipe holds the copy back to the pace of the writes and syncs, and a thread
    of its own runs the copy (it releases the GIL). A write that fails here closes
    the pipe, so the copy ends too (EPIPE) instead of waiting on a full pipe.
    """
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # 1 MiB: fewer, bigger reads
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _COPY_BYTES)
    failed: list[BaseException] = []

    def copy() -> None:
        try:
            store.copy_into(write_fd, txn)
        except BaseException as exc:  # handed to the reading side
            failed.append(exc)
        finally:
            os.close(write_fd)

    copier = threading.Thread(target=copy, name="snapshot-copy", daemon=True)
    copier.start()
    try:
        with open(read_fd, "rb", buffering=0) as src:
            result = _copy_synced(src, out)
    finally:
        copier.join()
    if failed:
        raise OSError(f"the state copy failed: {failed[0]}") from failed[0]
    return result


def _copy_synced(src: BinaryIO, out: BinaryIO) -> tuple[int, int]:
    """Copy the rest of `src` to `out`, durable when it returns; (crc32, bytes copied)."""
    crc, size, unsynced = 0, 0, 0
    while chunk := src.read(_COPY_BYTES):
        crc = crc32(chunk, crc)
        size += len(chunk)
        out.write(chunk)
        unsynced += len(chunk)
        if unsynced >= SYNC_BYTES:
            out.flush()
            os.fdatasync(out.fileno())
            unsynced = 0
    out.flush()
    os.fsync(out.fileno())
    return crc, size


def read_header(path: Path) -> SnapshotHeader:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) != 16 or head[:8] != MAGIC:
                raise CorruptDataError(f"{path}: not an mqnode snapshot")
            hlen = _U32.unpack(head[8:12])[0]
            hcrc = _U32.unpack(head[12:16])[0]
            raw = fh.read(hlen)
    except OSError as exc:
        raise CorruptDataError(f"{path}: unreadable snapshot: {exc.strerror}") from exc
    if len(raw) != hlen or crc32(raw) != hcrc:
        raise CorruptDataError(f"{path}: snapshot header checksum mismatch")
    h: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    return SnapshotHeader(
        last=(bytes(h["last"][0]), int(h["last"][1]), int(h["last"][2])),
        prev=(bytes(h["prev"][0]), int(h["prev"][1]), int(h["prev"][2])),
        cluster=list(h["cluster"]),
        state_size=int(h["state_size"]),
        state_crc32=int(h["state_crc32"]),
        data_offset=16 + hlen,
    )


def extract_state(path: Path, header: SnapshotHeader, dest_file: Path) -> None:
    """Copy the LMDB state out of a snapshot, verifying size and CRC."""
    with open(path, "rb") as src, open(dest_file, "wb") as out:
        src.seek(header.data_offset)
        crc, size = _copy_synced(src, out)
    if size != header.state_size or crc != header.state_crc32:
        dest_file.unlink(missing_ok=True)
        raise CorruptDataError(
            f"{path}: snapshot state damaged (size {size}/{header.state_size}, crc mismatch)"
        )


def install(path: Path, store: StateStore[Any]) -> SnapshotHeader:
    """Replace the store's contents with the snapshot at `path`."""
    header = read_header(path)
    tmp = path.with_name(path.name + ".state")
    try:
        extract_state(path, header, tmp)
        store.replace_from(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return header
