"""Snapshot files: a compacted LMDB copy of the queue state plus the Raft position.

pysyncobj calls our serializer at log compaction and ships the resulting file
to lagging followers (install snapshot); this module owns that file format:

    MAGIC (8) || header_len (u32 BE) || header (msgpack) || state (LMDB data.mdb)

header = {"index", "term", "last": [cmd, idx, term], "prev": [cmd, idx, term],
          "cluster": [addr, ...], "state_size", "state_crc32"}

The CRC covers the state bytes; the header has its own CRC in front of it.
A file that fails either check raises `CorruptDataError` and is never applied.
"""

from __future__ import annotations

import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from mqnode.errors import CorruptDataError
from mqnode.raft.contracts import StateStore

MAGIC = b"MQSNAP01"
_U32 = struct.Struct(">I")
_COPY_BYTES = 1 << 20
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
    """
    # A name, not a file: `copy_to` creates it. Reopening an existing file with "wb"
    # truncates it, and ext4 (auto_da_alloc) then writes the data back when the file is
    # closed, so the next journal commit waited for the whole copy: every node's fsyncs
    # on the disk stalled 100-150 ms at each snapshot (bench latency, 100 KiB).
    tmp_path = dest.parent / f".state-{secrets.token_hex(8)}"
    try:
        store.copy_to(tmp_path, txn)
        crc, size = 0, 0
        with open(tmp_path, "rb") as fh:
            while chunk := fh.read(_COPY_BYTES):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        header: bytes = msgpack.packb(
            {
                "last": list(last),
                "prev": list(prev),
                "cluster": cluster,
                "state_size": size,
                "state_crc32": crc,
            },
            use_bin_type=True,
        )
        with open(dest, "wb") as out, open(tmp_path, "rb") as src:
            out.write(MAGIC + _U32.pack(len(header)) + _U32.pack(zlib.crc32(header)) + header)
            copied = _copy_synced(src, out)
        if copied != (crc, size):  # the second pass's CRC costs ~10 ms per 70 MB: check it
            raise OSError(f"{tmp_path} changed while it was copied into a snapshot")
    finally:
        tmp_path.unlink(missing_ok=True)  # never synced: its dirty pages are dropped


def _copy_synced(src: BinaryIO, out: BinaryIO) -> tuple[int, int]:
    """Copy the rest of `src` to `out`, durable when it returns; (crc32, bytes copied)."""
    crc, size, unsynced = 0, 0, 0
    while chunk := src.read(_COPY_BYTES):
        crc = zlib.crc32(chunk, crc)
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
    if len(raw) != hlen or zlib.crc32(raw) != hcrc:
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
