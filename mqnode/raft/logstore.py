"""LogStore: the durable Raft journal in LMDB (`<data>/raft`).

Entries (index -> term, command) and the term/vote/commit metadata, each
batch in one synced transaction. Record format: crc32 (4 bytes, over the
rest) || msgpack([term, command]), or msgpack([term, deflated command,
DEFLATED]) for a big entry that went to followers deflated (raft/wire.py
`WireCommand`): stored as sent, it is not deflated again, and a message body
of text is written in a fraction of its bytes on every node. A gap, a bad
checksum or a command that does not inflate on load is `CorruptDataError`.
A journal with deflated records is not readable by releases before them.
The env is opened by mqnode/storage.py (`open_env`), the only module that
imports lmdb. Limits: `raft_map_size_mb`; a full map raises
`StoreFullError` and the batch is rolled back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mqnode.compression import INFLATE_ERROR
from mqnode.errors import CorruptDataError, StoreFullError
from mqnode.raft.wire import WireCommand
from mqnode.storage import (
    U32,
    U64,
    LmdbError,
    LmdbMapFullError,
    bin_header,
    checked_view,
    crc32,
    open_env,
    pack,
    storage_error,
    unpack,
)


class LogStore:
    """Durable Raft journal: entries (index -> term, command) and term/vote/commit metadata.

    Record format: crc32(4 bytes, over the rest) || msgpack([term, command]) or
    msgpack([term, deflated command, DEFLATED]).
    """

    def __init__(self, path: Path, map_size_mb: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.map_bytes = map_size_mb * 1024 * 1024
        self._env = open_env(path, self.map_bytes, 4, "raft log")
        self._log = self._env.open_db(b"log")
        self._meta = self._env.open_db(b"meta")

    def used_bytes(self) -> int:
        """Bytes of the pages holding entries now (an LMDB stat: no scan)."""
        with self._env.begin() as txn:
            st = txn.stat(self._log)
        return int((st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"])

    def load(self) -> list[tuple[bytes, int, int]]:
        """All entries in index order; a gap or bad checksum is corruption."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[tuple[bytes, int, int]]:
        """Entries in index order, one at a time (a log may be larger than memory should
        hold); a gap or bad checksum is corruption."""
        last = None
        try:
            with self._env.begin() as txn:
                for key, raw in txn.cursor(db=self._log):
                    idx = U64.unpack(key)[0]
                    term, cmd = _decode(idx, bytes(raw))
                    if last is not None and idx != last + 1:
                        raise CorruptDataError(f"raft log gap: {last} then {idx}")
                    last = idx
                    yield cmd, idx, term
        except LmdbError as exc:
            raise CorruptDataError(f"raft log: {exc}") from exc

    def read(self, idx: int) -> tuple[bytes, int]:
        """(command, term) of the entry at `idx`, which must be in the log."""
        try:
            with self._env.begin() as txn:
                raw = txn.get(U64.pack(idx), db=self._log)
                if raw is None:
                    raise CorruptDataError(f"raft log entry {idx} is missing")
                term, cmd = _decode(idx, bytes(raw))
        except LmdbError as exc:
            raise CorruptDataError(f"raft log: {exc}") from exc
        return cmd, term

    def get_meta(self) -> dict[str, Any]:
        with self._env.begin() as txn:
            raw = txn.get(b"meta", db=self._meta)
        return {} if raw is None else dict(unpack(raw))

    def write(
        self,
        ops: list[tuple[str, int, int, bytes]],
        meta: dict[str, Any] | None,
    ) -> None:
        """Apply journal ops in order, in one synced transaction.

        ops: ("add", idx, term, cmd) | ("del_from", idx, 0, b"") | ("del_to", idx, 0, b"")
        | ("clear", 0, 0, b"").
        """
        try:
            with self._env.begin(write=True) as txn:
                for op, idx, term, cmd in ops:
                    if op == "add":
                        txn.put(U64.pack(idx), _record(term, cmd), db=self._log)
                    elif op == "clear":
                        txn.drop(self._log, delete=False)
                    else:
                        self._delete_range(txn, op, idx)
                if meta is not None:
                    txn.put(b"meta", pack(meta), db=self._meta)
        except LmdbMapFullError as exc:
            raise StoreFullError("raft log map is full") from exc
        except LmdbError as exc:
            raise storage_error("raft log", exc) from exc

    def _delete_range(self, txn: Any, op: str, idx: int) -> None:
        cur = txn.cursor(db=self._log)
        if op == "del_from":
            if cur.set_range(U64.pack(idx)):
                while cur.delete():
                    pass
        else:  # del_to: delete every index below idx
            if cur.first():
                while U64.unpack(cur.key())[0] < idx:
                    if not cur.delete():
                        break

    def close(self) -> None:
        self._env.close()


def _record(term: int, cmd: bytes) -> bytes:
    """crc32 || msgpack([term, cmd]) or msgpack([term, deflated cmd, DEFLATED]), with one
    copy of the command (entries carry whole bodies): msgpack's framing is packed apart
    from the command and joined once."""
    packed = cmd.deflate_once() if type(cmd) is WireCommand else b""
    if packed:
        head = _TRIPLE + pack(term) + bin_header(len(packed))
        crc = crc32(_DEFLATED_TAIL, crc32(packed, crc32(head)))
        return b"".join([U32.pack(crc), head, packed, _DEFLATED_TAIL])
    head = _PAIR + pack(term) + bin_header(len(cmd))
    return b"".join([U32.pack(crc32(cmd, crc32(head))), head, cmd])


_PAIR = b"\x92"  # msgpack: an array of two
_TRIPLE = b"\x93"  # msgpack: an array of three
DEFLATED = 1  # the third item of a record whose command is a zlib stream
_DEFLATED_TAIL = pack(DEFLATED)


def _decode(idx: int, raw: bytes) -> tuple[int, bytes]:
    what = f"raft log entry {idx}"
    item = unpack(checked_view(raw, what))
    if not isinstance(item, list):
        raise CorruptDataError(f"{what}: not a record of this release")
    if len(item) == 2:
        return int(item[0]), bytes(item[1])
    if len(item) != 3 or item[2] != DEFLATED:
        raise CorruptDataError(f"{what}: not a record of this release")
    try:
        return int(item[0]), WireCommand.from_deflated(bytes(item[1]))
    except INFLATE_ERROR as exc:
        raise CorruptDataError(f"{what}: the command does not inflate: {exc}") from exc
