"""DurableJournal: pysyncobj's journal interface over `LogStore`, durable per batch.

pysyncobj calls `add`, `deleteEntriesFrom/To`, `setCurrentTerm` and friends
on its tick thread; we keep every entry's index and term in memory, and the
commands of the newest `RESIDENT_BYTES` (and of the log's first two entries,
which pysyncobj reads all the time); an older command is read back from LMDB
when asked for. A log may hold far more than memory should (compaction lets it
grow with a deep queue's state), and a 100 KiB message is a 100 KiB entry.
Writes are queued, and `flush()` (called by RaftNode once per tick) writes and
fsyncs them in one LMDB transaction, together with term, vote, commit index and the
member list the log leads to. Until that flush a follower's acknowledgement
is held back (transport.py), so an entry counts toward commit only once it
is on disk. A re-sent entry we kept must match; anything else is
`CorruptDataError`, never silently applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from pysyncobj.journal import Journal

from mqnode.errors import CorruptDataError, JournalDamagedError
from mqnode.raft.logstore import LogStore
from mqnode.raft.wire import wire_command

NO_OP = b"\x01"  # pysyncobj's _COMMAND_TYPE.NO_OP marker
MEMBERSHIP = b"\x02"  # _COMMAND_TYPE.MEMBERSHIP: pickled [op, node id, node], op "add"/"rem"
MEMBERSHIP_TYPE = MEMBERSHIP[0]

Entry = tuple[bytes, int, int]
# An entry whose command is not in memory: (None, index, term).
Slot = tuple[bytes | None, int, int]

# Commands kept in memory, newest first: what followers are sent and the tick applies.
RESIDENT_BYTES = 64 * 1024 * 1024
# pysyncobj reads the log's first entries at every send: always kept in memory.
PINNED = 2


class DurableJournal(Journal):  # type: ignore[misc]
    """pysyncobj's journal interface over `LogStore`: the newest commands in memory, the
    rest read back when asked for; durable per batch."""

    def __init__(self, store: LogStore, resident_bytes: int = RESIDENT_BYTES) -> None:
        self._store = store
        self._budget = resident_bytes
        self._entries: list[Slot] = []
        self._resident_bytes = 0  # of the commands in memory
        # Positions below PINNED and from _resident_from on have their command in memory;
        # those in between were evicted (None).
        self._resident_from = 0
        self._ops: list[tuple[str, int, int, bytes]] = []
        for c, i, t in store.iter_entries():
            self._append(c, i, t)
            self._evict()
        self._meta: dict[str, Any] = store.get_meta()
        self._meta_dirty = False
        # Entries went out to followers (DeferringTransport.send) since the last flush: a
        # leader's own copy must reach disk before acks for them count (RaftNode, W22).
        self.sent_unflushed = False
        self.applied_index: Callable[[], int] = lambda: 0  # set by RaftNode once it exists
        # The member list the in-memory log leads to (None: do not store one yet). Read at
        # every write, so the stored list always matches the entries written with it.
        self.members: Callable[[], list[str] | None] = lambda: None
        if not self._entries:
            self.add(NO_OP, 1, int(self._meta.get("term", 0)))
            self.flush()

    def _append(self, command: bytes, idx: int, term: int) -> None:
        # Big commands as WireCommands: deflated once for all followers (wire.py).
        self._entries.append((wire_command(command), idx, term))
        self._resident_bytes += len(command)

    def _evict(self) -> None:
        """Drop the oldest commands in memory past the budget; only flushed ones (their
        copy on disk is what a later read returns), never the pinned first entries nor
        the last one."""
        unflushed = sum(1 for op in self._ops if op[0] == "add")
        entries = self._entries
        pos = max(self._resident_from, PINNED)
        end = len(entries) - max(unflushed, 1)  # the last entry too is read at every tick
        while self._resident_bytes > self._budget and pos < end:
            command, idx, term = entries[pos]
            if command is not None:
                self._resident_bytes -= len(command)
                entries[pos] = (None, idx, term)
            pos += 1
        self._resident_from = max(self._resident_from, pos)

    def _entry(self, pos: int) -> Entry:
        command, idx, term = self._entries[pos]
        if command is None:
            command = self._read(idx)
        return command, idx, term

    def _read(self, idx: int) -> bytes:
        try:
            return wire_command(self._store.read(idx)[0])
        except CorruptDataError as exc:
            raise JournalDamagedError(str(exc)) from exc

    def _forget(self, removed: list[Slot]) -> None:
        self._resident_bytes -= sum(len(c) for c, _i, _t in removed if c is not None)

    def _pin_head(self) -> None:
        """Read the log's first entries back into memory (after compaction moved them)."""
        for pos in range(min(PINNED, len(self._entries))):
            command, idx, term = self._entries[pos]
            if command is None:
                command = self._read(idx)
                self._entries[pos] = (command, idx, term)
                self._resident_bytes += len(command)

    # -- the interface pysyncobj calls ---------------------------------------
    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._entries and idx <= self._entries[-1][1]:
            # A re-sent entry we kept (see deleteEntriesFrom): must be the same entry.
            first = self._entries[0][1]
            if idx < first or self._entries[idx - first][2] == term:
                return
            raise CorruptDataError(
                f"leader sent index {idx} term {term}, but the applied entry there has term "
                f"{self._entries[idx - first][2]}"
            )
        if self._entries and idx != self._entries[-1][1] + 1:
            raise CorruptDataError(f"journal add out of order: {idx} after {self._entries[-1][1]}")
        self._append(command, idx, term)
        # The object kept in memory, so a big entry is stored deflated as it was sent.
        self._ops.append(("add", idx, term, self._entries[-1][0] or command))

    def clear(self) -> None:
        self._entries = []
        self._resident_bytes = self._resident_from = 0
        self._ops.append(("clear", 0, 0, b""))

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        idx = self._entries[entryFrom][1]
        floor = self.applied_index() + 1
        if idx < floor:
            # pysyncobj truncates from a re-sent batch's start even below what was applied,
            # then re-appends only that batch; a crash in between left the log shorter than
            # the state. Applied entries are committed, so identical everywhere: keep them.
            entryFrom += floor - idx
            if entryFrom >= len(self._entries):
                return
            idx = floor
        self._forget(self._entries[entryFrom:])
        del self._entries[entryFrom:]
        self._resident_from = min(self._resident_from, len(self._entries))
        self._ops.append(("del_from", idx, 0, b""))

    def deleteEntriesTo(self, entryTo: int) -> None:
        # Never compact away the last two entries: pysyncobj can ask to delete past the
        # end of the log, after which every tick raises IndexError.
        entryTo = min(entryTo, len(self._entries) - 2)
        if entryTo <= 0:
            return
        idx = self._entries[entryTo][1]
        self._forget(self._entries[:entryTo])
        self._entries = self._entries[entryTo:]
        self._resident_from = max(self._resident_from - entryTo, 0)
        self._ops.append(("del_to", idx, 0, b""))
        self._pin_head()

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> Sequence[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self._entries))
            if step == 1 and start >= self._resident_from:
                return self._entries[start:stop]  # type: ignore[return-value]  # all in memory
            return _Entries(self, range(start, stop, step))
        return self._entry(item)

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        pass

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._meta.get("commit") != raftCommitIndex:
            self._meta["commit"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("commit", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        self._meta["term"] = term
        self._meta["vote"] = votedForNodeId
        self.flush(force_meta=True)  # durable before any vote message leaves

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> str | None:
        vote = self._meta.get("vote")
        return None if vote is None else str(vote)

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty and not self._ops:
            self.flush(force_meta=True)

    # -- ours ------------------------------------------------------------------
    def term_at(self, pos: int) -> int:
        """The term of the entry at list position `pos`, never read from disk."""
        return self._entries[pos][2]

    def index_at(self, pos: int) -> int:
        """The log index of the entry at list position `pos`, never read from disk."""
        return self._entries[pos][1]

    @property
    def resident_bytes(self) -> int:
        """Bytes of commands held in memory (metrics and tests)."""
        return self._resident_bytes

    @property
    def dirty(self) -> bool:
        return bool(self._ops)

    def durable_through(self, index: int) -> bool:
        """Whether no pending op touches an entry at or below `index` (they are on disk)."""
        for op, idx, _term, _cmd in self._ops:
            if op == "clear" or (op in ("add", "del_from") and idx <= index):
                return False
        return True

    def stored_members(self) -> list[str] | None:
        members = self._meta.get("members")
        return None if members is None else [str(m) for m in members]

    def set_members(self, members: list[str]) -> None:
        self._meta["members"] = sorted(members)
        self.flush(force_meta=True)

    def members_changed(self) -> bool:
        """Whether the log now leads to a member list other than the stored one."""
        return self._new_members() is not None

    def _new_members(self) -> list[str] | None:
        members = self.members()
        return members if members is not None and members != self._meta.get("members") else None

    def flush(self, force_meta: bool = False) -> int:
        """Write pending ops (and metadata) in one synced transaction; returns entries added."""
        members = self._new_members()
        if members is not None:
            self._meta["members"] = members
            force_meta = True
        if not self._ops and not force_meta:
            self.sent_unflushed = False  # nothing pending: whatever went out is on disk
            return 0
        ops = self._ops
        self._store.write(ops, dict(self._meta))  # on failure ops stay pending, acks stay held
        self._ops = []
        self._meta_dirty = False
        self.sent_unflushed = False
        self._evict()
        return sum(1 for op in ops if op[0] == "add")

    def reset(self, entries: list[Entry]) -> None:
        self.clear()
        for e in entries:
            self.add(*e)
        self.flush()


class _Entries(Sequence[Entry]):
    """A slice of the journal that reads commands not in memory only when asked for:
    pysyncobj slices from a lagging follower's next index to the log's end, then sends
    only the first ones that fit a batch."""

    def __init__(self, journal: DurableJournal, positions: range) -> None:
        self._journal = journal
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> Sequence[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(item, slice):
            return [self._journal._entry(p) for p in self._positions[item]]
        return self._journal._entry(self._positions[item])

    def __iter__(self) -> Iterator[Entry]:
        for pos in self._positions:
            yield self._journal._entry(pos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]
