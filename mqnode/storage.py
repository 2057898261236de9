"""The LMDB adapter: the only module that imports `lmdb` (and msgpack for records).

Both LMDB environments of a data dir are opened here (`open_env`): the queue
state (spool/store.py) and the Raft journal (raft/logstore.py). What they
share lives here too: record codecs (msgpack), a CRC32 in front of records
(LMDB has none; `crc32`), the mapping of lmdb's errors to ours (`storage_error`: a full
disk or map is `StoreFullError`, retryable; anything else `CorruptDataError`)
and `fsync_path` for files and directories.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import msgpack
from isal import isal_zlib

from mqnode.errors import CorruptDataError, StoreFullError

U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
LmdbError = lmdb.Error
LmdbMapFullError = lmdb.MapFullError
READ_ALL_TIMEOUT_S = 600.0  # reading a state of several GB back once (open_env)


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False)


# Bytes this big are a piece of their own in `pack_pieces`.
OWN_PIECE_BYTES = 64 * 1024


def pack_pieces(obj: Any) -> list[bytes]:
    """`pack(obj)` in pieces to be joined or written out with `writelines`: bytes of
    `OWN_PIECE_BYTES` or more (a body chunk), in lists at any depth, are pieces of
    their own behind msgpack's bin header. `packb` would copy such bytes into its
    buffer and again into the bytes it returns; this copies none of them."""
    if not _has_big_bytes(obj):
        return [pack(obj)]
    pieces: list[bytes] = []
    head: list[bytes] = []
    _pack_into(obj, head, pieces)
    if head:
        pieces.append(b"".join(head))
    return pieces


def _has_big_bytes(obj: Any) -> bool:
    if type(obj) is bytes:
        return len(obj) >= OWN_PIECE_BYTES
    return type(obj) is list and any(map(_has_big_bytes, obj))


def _pack_into(obj: Any, head: list[bytes], pieces: list[bytes]) -> None:
    if type(obj) is bytes and len(obj) >= OWN_PIECE_BYTES:
        head.append(bin_header(len(obj)))
        pieces.append(b"".join(head))
        pieces.append(obj)
        head.clear()
    elif type(obj) is list and _has_big_bytes(obj):
        head.append(array_header(len(obj)))
        for item in obj:
            _pack_into(item, head, pieces)
    else:
        head.append(pack(obj))


_HEADERS = msgpack.Packer(use_bin_type=True)


def array_header(size: int) -> bytes:
    """msgpack's header of an array of `size` items (its items follow, packed apart)."""
    out: bytes = _HEADERS.pack_array_header(size)
    return out


def bin_header(size: int) -> bytes:
    """msgpack's bin 8/16/32 header for `size` bytes (what `pack` writes before bytes):
    with it, bytes of a MiB can be framed and joined with the rest in one copy."""
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: a rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_env(path: Path, map_size: int, max_dbs: int, what: str, sync: bool = True) -> Any:
    """Open an LMDB env, refusing a truncated data file before LMDB maps past its end.

    (LMDB reads pages through mmap: a page beyond EOF is SIGBUS, not an error.)
    """
    try:
        env = lmdb.open(str(path), map_size=map_size, max_dbs=max_dbs, sync=sync)
    except lmdb.Error as exc:
        raise CorruptDataError(f"cannot open {what} {path}: {exc}") from exc
    data_file = path / "data.mdb"
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = os.path.getsize(data_file)
    if actual < needed:
        # A transaction that allocated pages and freed them again before it committed
        # (puts and deletes in one) leaves LMDB's last page number past the end of the
        # file: those pages are free and were never written. Only a file whose used
        # pages all lie within it is whole: a child process reads every record of
        # every database (a page past the end kills it with SIGBUS, not us).
        if not _reads_whole(path, max_dbs, map_size):
            env.close()
            raise CorruptDataError(
                f"{what} {data_file} is truncated ({actual} bytes, needs {needed}); "
                "restore it or move the data dir away to resync this node from its peers"
            )
        os.truncate(data_file, needed)  # the free tail, sparse: nothing past it is read
    return env


_READ_ALL = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=int(sys.argv[2]),
                map_size=int(sys.argv[3]))
with env.begin(buffers=True) as txn:
    names = [bytes(k) for k in txn.cursor().iternext(values=False)]
    for name in names:
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.Error:
            continue  # a plain key of the main database, not a database's name
        for _key, value in txn.cursor(db=db):
            bytes(value[-1:])  # touch the value's last page (overflow pages included)
"""


def _reads_whole(path: Path, max_dbs: int, map_size: int) -> bool:
    """Whether every record of the LMDB env at `path` reads back (in a child process)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _READ_ALL, str(path), str(max_dbs), str(map_size)],
            capture_output=True,
            timeout=READ_ALL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False  # not shown whole: refused as truncated
    return done.returncode == 0


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 (the same values), computed by ISA-L with carry-less multiplication:
    ~3 us per 100 KiB where the system zlib takes ~40. Every message body is checksummed
    in the journal and the state on every node, and again when it is read."""
    return isal_zlib.crc32(data, value)


# XORed into a record's CRC32: the record is marked (it holds its data in another form,
# which a reader must know: spool/store.py's deflated bodies). A reader of plain records
# refuses a marked one as corrupt.
_MARK = 0xFFFFFFFF


def with_crc(data: bytes, marked: bool = False) -> bytes:
    return U32.pack(crc32(data) ^ (_MARK if marked else 0)) + data


def crc_view(raw: bytes | memoryview, what: str) -> tuple[memoryview, bool]:
    """What follows the CRC32 in front of a record, as a view (a record may be a body of
    a few MiB, and a slice would copy it), and whether the record is marked
    (`with_crc`); CorruptDataError if the CRC matches neither way."""
    view = memoryview(raw)[4:]
    if len(raw) >= 4:
        stored, crc = U32.unpack_from(raw)[0], crc32(view)
        if stored == crc:
            return view, False
        if stored == crc ^ _MARK:
            return view, True
    raise CorruptDataError(f"{what}: checksum mismatch")


def checked_view(raw: bytes | memoryview, what: str) -> memoryview:
    """`crc_view` of a record that is never marked."""
    view, marked = crc_view(raw, what)
    if marked:
        raise CorruptDataError(f"{what}: checksum mismatch")
    return view


def check_crc(raw: bytes, what: str) -> bytes:
    """LMDB has no record checksums: every queue record carries a CRC32 in front."""
    checked_view(raw, what)
    return raw[4:]


def storage_error(what: str, exc: Exception) -> Exception:
    """ENOSPC and friends become StoreFullError (retryable); anything else is corruption."""
    text = str(exc)
    if "No space left" in text or "Disk quota" in text or "MDB_MAP_FULL" in text:
        return StoreFullError(f"{what}: {text}")
    return CorruptDataError(f"{what}: {text}")
