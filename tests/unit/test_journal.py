"""DurableJournal over a real LogStore: what survives a reload, and what must not.

"Reload" closes the LMDB environment and builds a new journal from the same
directory, as a restarted node does.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqnode.errors import CorruptDataError, JournalDamagedError, StoreFullError
from mqnode.raft import NO_OP, DurableJournal
from mqnode.raft.journal import PINNED, RESIDENT_BYTES
from mqnode.raft.logstore import LogStore
from mqnode.raft.wire import WireCommand, loads

_U64 = struct.Struct(">Q")
Entry = tuple[bytes, int, int]


class Journals:
    """Opens, reloads and closes journals on one directory (one LMDB env open at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: LogStore | None = None

    def open(self, resident_bytes: int = RESIDENT_BYTES) -> DurableJournal:
        self.close()
        self._store = LogStore(self.path, map_size_mb=16)
        return DurableJournal(self._store, resident_bytes)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


@pytest.fixture
def journals(tmp_path: Path) -> Iterator[Journals]:
    j = Journals(tmp_path / "raft")
    try:
        yield j
    finally:
        j.close()


@contextmanager
def fresh_journals() -> Iterator[Journals]:
    with tempfile.TemporaryDirectory(prefix="mqnode-journal-") as d:
        j = Journals(Path(d) / "raft")
        try:
            yield j
        finally:
            j.close()


def entries(j: DurableJournal) -> list[Entry]:
    return [j[i] for i in range(len(j))]


def fill(j: DurableJournal, n: int, term: int = 1) -> None:
    last = j[-1][1]
    for idx in range(last + 1, last + 1 + n):
        j.add(f"cmd-{idx}".encode(), idx, term)


def test_fresh_journal_starts_with_a_durable_no_op(journals: Journals) -> None:
    j = journals.open()
    assert entries(j) == [(NO_OP, 1, 0)]
    assert not j.dirty
    assert entries(journals.open()) == [(NO_OP, 1, 0)]


def test_add_flush_reload_returns_the_same_entries(journals: Journals) -> None:
    j = journals.open()
    fill(j, 5, term=2)
    j.add(b"\x00\xffbinary", 7, 3)
    assert j.dirty
    assert j.flush() == 6
    assert not j.dirty
    expected = entries(j)
    assert expected[-1] == (b"\x00\xffbinary", 7, 3)
    assert entries(journals.open()) == expected


def test_add_out_of_order_raises(journals: Journals) -> None:
    j = journals.open()
    with pytest.raises(CorruptDataError):
        j.add(b"x", 3, 1)


def test_unflushed_adds_are_lost_on_reload(journals: Journals) -> None:
    # Why acknowledgements wait for the tick's flush: until then an entry is only in memory.
    j = journals.open()
    fill(j, 3)
    j.flush()
    durable = entries(j)
    fill(j, 4)
    assert len(j) == 8 and j.dirty
    assert entries(journals.open()) == durable


def test_delete_entries_from_persists(journals: Journals) -> None:
    j = journals.open()
    fill(j, 5)  # indexes 1..6
    j.flush()
    j.deleteEntriesFrom(3)  # a position: drops indexes 4..6
    assert [e[1] for e in entries(j)] == [1, 2, 3]
    j.flush()
    assert entries(journals.open()) == entries(j)


def test_conflicting_suffix_is_replaced_durably(journals: Journals) -> None:
    # The Raft case: a follower drops a conflicting suffix and appends the leader's entries,
    # all in the same flush.
    j = journals.open()
    fill(j, 5, term=1)
    j.flush()
    j.deleteEntriesFrom(3)
    j.add(b"new-4", 4, 2)
    j.add(b"new-5", 5, 2)
    j.flush()
    reloaded = entries(journals.open())
    assert reloaded[3:] == [(b"new-4", 4, 2), (b"new-5", 5, 2)]
    assert len(reloaded) == 5


def test_delete_entries_from_past_the_end_is_a_no_op(journals: Journals) -> None:
    j = journals.open()
    fill(j, 2)
    j.flush()
    j.deleteEntriesFrom(10)
    assert not j.dirty and len(j) == 3


def test_delete_entries_to_persists(journals: Journals) -> None:
    j = journals.open()
    fill(j, 9)  # indexes 1..10
    j.flush()
    j.deleteEntriesTo(4)  # keep positions 4.. -> indexes 5..10
    assert [e[1] for e in entries(j)] == [5, 6, 7, 8, 9, 10]
    j.flush()
    reloaded = journals.open()
    assert entries(reloaded) == entries(j)
    fill(reloaded, 1)
    reloaded.flush()
    assert [e[1] for e in entries(journals.open())] == [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("length", [1, 2, 3, 6])
@pytest.mark.parametrize("entry_to", [0, 1, 2, 5, 6, 7, 100])
def test_delete_entries_to_keeps_at_least_two(
    journals: Journals, length: int, entry_to: int
) -> None:
    j = journals.open()
    fill(j, length - 1)
    j.flush()
    j.deleteEntriesTo(entry_to)
    assert len(j) >= min(length, 2)
    assert len(j) == length - max(0, min(entry_to, length - 2))
    assert j[-1][1] == length  # the tail is never touched
    j.flush()
    assert entries(journals.open()) == entries(j)


def test_set_current_term_is_durable_without_flush(journals: Journals) -> None:
    j = journals.open()
    j.setCurrentTerm(5, "127.0.0.1:7002")
    reloaded = journals.open()
    assert reloaded.getCurrentTerm() == 5
    assert reloaded.getVotedForNodeId() == "127.0.0.1:7002"
    reloaded.setCurrentTerm(6, None)
    again = journals.open()
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (6, None)


def test_commit_index_is_written_by_the_timer_or_the_next_flush(journals: Journals) -> None:
    j = journals.open()
    fill(j, 3)
    j.flush()
    j.setRaftCommitIndex(3)
    assert journals.open().getRaftCommitIndex() == 1  # default until written

    j = journals.open()
    j.setRaftCommitIndex(3)
    j.onOneSecondTimer()
    assert journals.open().getRaftCommitIndex() == 3


def test_reset_replaces_the_log(journals: Journals) -> None:
    j = journals.open()
    fill(j, 4)
    j.flush()
    j.reset([(b"prev", 40, 3), (b"last", 41, 3)])
    assert entries(journals.open()) == [(b"prev", 40, 3), (b"last", 41, 3)]


def test_failed_flush_keeps_ops_pending(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "small", map_size_mb=1)
    try:
        j = DurableJournal(store)
        j.add(os.urandom(2 * 1024 * 1024), 2, 1)  # random: stored as it is, not deflated
        with pytest.raises(StoreFullError):
            j.flush()
        assert j.dirty  # acks stay held: nothing claims the entry is durable
        assert store.load() == [(NO_OP, 1, 0)]
    finally:
        store.close()


# -- big entries: stored as they went to followers -------------------------------------------

BIG_TEXT = b"\x03" + b"<p>A newsletter paragraph, line after line.</p>\r\n" * 3000


def _raw_record(path: Path, idx: int) -> bytes:
    env = lmdb.open(str(path), map_size=16 * 1024 * 1024, max_dbs=4, readonly=True)
    try:
        with env.begin() as txn:
            return bytes(txn.get(_U64.pack(idx), db=env.open_db(b"log", txn=txn)))
    finally:
        env.close()


def test_a_big_entry_of_text_is_stored_deflated_and_reads_back_whole(journals: Journals) -> None:
    j = journals.open()
    j.add(BIG_TEXT, 2, 1)
    j.flush()
    journals.close()
    assert len(_raw_record(journals.path, 2)) < len(BIG_TEXT) // 10
    j = journals.open(resident_bytes=0)  # read back from LMDB, not from memory
    command, idx, term = j[1]
    assert (command, idx, term) == (BIG_TEXT, 2, 1)
    assert type(command) is WireCommand and zlib.decompress(command.deflate_once()) == BIG_TEXT


def test_a_follower_stores_the_deflated_bytes_it_received(journals: Journals) -> None:
    """The pickle names zlib.decompress on the deflated command: this release unpickles it
    into a WireCommand that keeps them, and the journal writes those, not deflating again."""
    sent = WireCommand(BIG_TEXT)
    got = loads(pickle.dumps([(sent, 2, 1)], protocol=5))[0][0]
    assert type(got) is WireCommand and got == BIG_TEXT
    assert got.__dict__["deflated"] == sent.deflate_once()
    j = journals.open()
    j.add(got, 2, 1)
    j.flush()
    journals.close()
    record = _raw_record(journals.path, 2)
    assert sent.deflate_once() in record and len(record) < len(sent.deflate_once()) + 32


def test_a_big_entry_that_does_not_compress_is_stored_as_it_is(journals: Journals) -> None:
    random_body = b"\x03" + os.urandom(200_000)
    # as a follower gets it: sent stored, known not to compress (not sampled again)
    got = loads(pickle.dumps([(WireCommand(random_body), 2, 1)], protocol=5))[0][0]
    assert type(got) is WireCommand and got.__dict__["deflated"] == b""
    assert loads(pickle.dumps(bytes, protocol=5))(b"abc") == b"abc"  # other bytes() calls
    j = journals.open()
    j.add(got, 2, 1)
    j.flush()
    journals.close()
    assert random_body in _raw_record(journals.path, 2)
    assert entries(journals.open(resident_bytes=0))[1] == (random_body, 2, 1)


def test_a_deflated_record_that_does_not_inflate_is_corruption(journals: Journals) -> None:
    j = journals.open()
    j.add(BIG_TEXT, 2, 1)
    j.flush()
    journals.close()

    def break_stream(txn: Any, db: Any) -> None:
        # a valid checksum over a stream cut short: only inflating can tell
        record = bytearray(txn.get(_U64.pack(2), db=db))
        term, packed, codec = msgpack.unpackb(bytes(record[4:]))
        body = msgpack.packb([term, packed[: len(packed) // 2], codec], use_bin_type=True)
        txn.put(_U64.pack(2), struct.pack(">I", zlib.crc32(body)) + body, db=db)

    _tamper(journals.path, break_stream)
    with pytest.raises(CorruptDataError, match=r"entry 2.*inflate"):
        journals.open()


@pytest.mark.parametrize("item", [[1, b"cmd", 7], 5, {"a": 1}], ids=["codec", "int", "map"])
def test_a_record_of_an_unknown_encoding_is_corruption(journals: Journals, item: object) -> None:
    j = journals.open()
    fill(j, 2)
    j.flush()
    journals.close()
    body = msgpack.packb(item, use_bin_type=True)
    record = struct.pack(">I", zlib.crc32(body)) + body
    _tamper(journals.path, lambda txn, db: txn.put(_U64.pack(2), record, db=db))
    with pytest.raises(CorruptDataError, match="entry 2"):
        journals.open()


# -- corruption -------------------------------------------------------------------------------


def _tamper(path: Path, fn: Any) -> None:
    env = lmdb.open(str(path), map_size=16 * 1024 * 1024, max_dbs=4)
    try:
        db = env.open_db(b"log")
        with env.begin(write=True) as txn:
            fn(txn, db)
    finally:
        env.close()


@pytest.mark.parametrize("offset", [0, 3, 4, 5, -1], ids=lambda o: f"byte{o}")
def test_flipped_byte_in_a_record_is_corruption(journals: Journals, offset: int) -> None:
    j = journals.open()
    fill(j, 4)
    j.flush()
    journals.close()

    def flip(txn: Any, db: Any) -> None:
        key = _U64.pack(3)
        raw = bytearray(txn.get(key, db=db))
        raw[offset] ^= 0x01
        txn.put(key, bytes(raw), db=db)

    _tamper(journals.path, flip)
    with pytest.raises(CorruptDataError, match="entry 3"):
        journals.open()


def test_short_record_is_corruption(journals: Journals) -> None:
    j = journals.open()
    fill(j, 2)
    j.flush()
    journals.close()
    _tamper(journals.path, lambda txn, db: txn.put(_U64.pack(2), b"\x00\x01", db=db))
    with pytest.raises(CorruptDataError):
        journals.open()


def test_gap_in_the_log_is_corruption(journals: Journals) -> None:
    j = journals.open()
    fill(j, 4)
    j.flush()
    journals.close()
    _tamper(journals.path, lambda txn, db: txn.delete(_U64.pack(3), db=db))
    with pytest.raises(CorruptDataError, match="gap"):
        journals.open()


# -- random operation sequences ---------------------------------------------------------------

journal_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 4)),
        st.tuples(st.just("del_from"), st.integers(1, 12)),
        st.tuples(st.just("del_to"), st.integers(0, 12)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("term"), st.integers(0, 9)),
    ),
    max_size=15,
)


@settings(max_examples=40, deadline=None)
@given(journal_ops)
def test_flushed_journal_reloads_exactly(ops: list[tuple[str, int]]) -> None:
    with fresh_journals() as js:
        j = js.open()
        term = 1
        for op, arg in ops:
            if op == "add":
                fill(j, arg, term)
            elif op == "del_from":
                j.deleteEntriesFrom(arg)
            elif op == "del_to":
                before = len(j)
                j.deleteEntriesTo(arg)
                assert len(j) >= min(before, 2)
            elif op == "flush":
                j.flush()
            else:
                term += arg
                j.setCurrentTerm(term, None)
        j.flush()
        expected = entries(j)
        reloaded = js.open()
        assert entries(reloaded) == expected
        assert reloaded.getCurrentTerm() == j.getCurrentTerm()


def test_resent_batch_never_truncates_applied_entries(journals: Journals) -> None:
    """pysyncobj truncates from a re-sent batch's start, even below the applied index.

    Seen in the chaos run: a follower then crashed with its log shorter than its state.
    The journal keeps applied (committed) entries and skips identical re-adds.
    """
    j = journals.open()
    fill(j, 20)  # indexes 2..21
    j.flush()
    j.applied_index = lambda: 15
    before = entries(j)
    # The leader re-sends 10..12 after prevLogIdx 9: pysyncobj deletes from 10 and re-adds.
    j.deleteEntriesFrom(10 - j[0][1])
    for idx in (10, 11, 12):
        j.add(f"cmd-{idx}".encode(), idx, 1)
    j.flush()
    kept = entries(journals.open())
    assert kept[-1][1] >= 15, "applied entries were truncated"
    assert kept == before[: 15 - before[0][1] + 1]


def test_resent_entry_with_another_term_at_an_applied_index_is_corruption(
    journals: Journals,
) -> None:
    j = journals.open()
    fill(j, 10)
    j.applied_index = lambda: 8
    with pytest.raises(CorruptDataError):
        j.add(b"other", 5, 2)


def test_durable_through_names_what_pending_ops_leave_alone(journals: Journals) -> None:
    # The leader commits its state before its journal fsync only when every applied entry
    # is already on disk: no pending add or truncation at or below the applied index.
    j = journals.open()
    fill(j, 5)  # indexes 1..6
    j.flush()
    assert j.durable_through(6)
    fill(j, 2)  # 7, 8 pending
    assert j.durable_through(6) and not j.durable_through(7)
    j.flush()
    j.deleteEntriesFrom(5)  # pending truncation of 6..8
    assert j.durable_through(5) and not j.durable_through(6)
    j.flush()
    j.clear()
    assert not j.durable_through(0)


@settings(max_examples=60, deadline=None)
@given(journal_ops, st.integers(0, 3))
def test_a_journal_holding_few_commands_in_memory_reads_the_same(
    ops: list[tuple[str, int]], reloads: int
) -> None:
    """Commands past the memory budget are read back from LMDB: entries, slices (as
    pysyncobj takes them) and what a reload finds are the same as with all in memory."""
    with fresh_journals() as full, fresh_journals() as lean:
        a, b = full.open(), lean.open(resident_bytes=0)
        term = 1
        for n, (op, arg) in enumerate(ops):
            for j in (a, b):
                if op == "add":
                    fill(j, arg, term)
                elif op == "del_from":
                    j.deleteEntriesFrom(arg)
                elif op == "del_to":
                    j.deleteEntriesTo(arg)
                elif op == "flush":
                    j.flush()
                else:
                    j.setCurrentTerm(term + arg, None)
            if op == "term":
                term += arg
            assert entries(b) == entries(a)
            for start in range(len(a)):
                assert list(b[start:]) == list(a[start:])
                assert list(b[start:][:2]) == list(a[start:][:2])
            assert [b.term_at(i) for i in range(len(b))] == [e[2] for e in entries(a)]
            if n == reloads:
                a.flush(), b.flush()
                a, b = full.open(), lean.open(resident_bytes=0)
        b.flush()
        in_memory = sum(len(c) for c, _i, _t in b._entries if c is not None)
        assert in_memory == b.resident_bytes
        assert all(c is None for c, _i, _t in b._entries[PINNED:-1])


def test_big_entries_past_the_budget_leave_memory(journals: Journals) -> None:
    j = journals.open(resident_bytes=1_000_000)
    for idx in range(2, 52):
        j.add(bytes([idx]) * 100_000, idx, 1)
        j.flush()
    assert j.resident_bytes <= 1_000_000 + PINNED * 100_000
    assert j[9] == (bytes([10]) * 100_000, 10, 1)  # position 9 (index 1 is the no-op): from disk
    expected = entries(j)
    reloaded = journals.open(resident_bytes=1_000_000)
    assert reloaded.resident_bytes <= 1_000_000 + PINNED * 100_000
    assert entries(reloaded) == expected


def test_a_command_damaged_on_disk_after_the_start_is_a_journal_error(
    journals: Journals,
) -> None:
    """Read back while the node runs, a damaged entry stops the node (RaftNode treats
    JournalDamagedError as fatal) instead of failing every tick."""
    j = journals.open(resident_bytes=0)
    fill(j, 5)
    j.flush()
    assert j[3][0] == b"cmd-4"  # read back from disk
    env = j._store._env  # the running node's own env: LMDB opens a file once per process
    log = env.open_db(b"log")
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(_U64.pack(4), db=log))
        raw[-1] ^= 0xFF
        txn.put(_U64.pack(4), bytes(raw), db=log)
    with pytest.raises(JournalDamagedError, match="checksum"):
        j[3]
