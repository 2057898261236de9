"""QueueStore: the queue state in LMDB (through mqnode/storage.py, the lmdb adapter).

Two environments per data dir, each with one job:

* `QueueStore` (`<data>/state`): the replicated state machine's output —
  messages, bodies, the due-time indexes (all mail; and per recipient domain,
  so a scan can jump over a domain's backlog in one seek), idempotency keys,
  counters and the last applied Raft index. Writes happen only on the Raft tick thread, in one
  transaction per tick (`apply_txn` / `commit_apply`), so many entries share a
  commit. Reads from other threads go through `reader()`.
* `LogStore` (`<data>/raft`, raft/logstore.py): the durable Raft journal and
  term/vote/commit metadata, written in one synced transaction per batch.

Durability: the journal fsyncs every write; the state does not. Everything in
the state is derived from the log, and `snapshot.bin` plus the journal after
it always rebuild it, so a state commit skips the fsync (+2-9% acceptance
in alternated A/B pairs). What that costs is only a kernel crash or
power loss, never a killed process (its writes are in the page cache): a
marker holding the kernel's boot id is made durable before the first
unsynced commit, and a state found with the marker of another boot is
discarded at open and rebuilt (RaftNode's startup repair). A clean close
syncs the state and removes the marker. Without a boot id (not Linux)
every state commit fsyncs. The kernel reports a failed writeback
of those pages only to a later fsync, and serves the pages it could not
write only until it evicts them (then reads return what the disk holds,
silently): the node calls `sync_state` every few seconds, and on an error
the marker is overwritten so that no boot matches it, and the node stops
(W27, node.py): the next open discards the state and rebuilds it.

Limits: map sizes are set at open (`*_map_size_mb`); a full map raises
`StoreFullError` and the transaction is rolled back, never half-applied.
Committed entries must still apply (a node that cannot apply cannot apply the
deletes that would free space either), so the state map may grow past its
configured size, a quarter at a time up to twice it (`grow_for_apply`);
ingress measures its fill against the configured size and keeps refusing.
Log records carry a CRC32 because LMDB has none; a mismatch raises
`CorruptDataError`. A body is kept as the chunks it came in, or, deflated where
it was accepted (mqnode/compression.py), as one record whose CRC32 is stored
inverted: the mark that it is inflated when read.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Container, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mqnode.compression import inflate, inflate_head
from mqnode.errors import CorruptDataError, StateMapFullError
from mqnode.spool.model import MessageState, QueuedMessage, RcptState
from mqnode.spool.record_memo import RecordMemo
from mqnode.spool.suppression import Entry, lookup_keys, split_key
from mqnode.spool.suppression import key as suppression_key
from mqnode.storage import (
    U32,
    U64,
    LmdbError,
    LmdbMapFullError,
    check_crc,
    crc_view,
    fsync_path,
    open_env,
    pack,
    storage_error,
    unpack,
    with_crc,
)

log = logging.getLogger("mqnode.spool.store")

FILL_REFRESH_COMMITS = 8
# How far past its configured size the state map may grow to apply committed entries.
APPLY_HEADROOM_STEP = 0.25
APPLY_HEADROOM_MAX = 2.0
COUNT_KEYS = {s: f"count_{s.value}".encode() for s in MessageState}
# Meta key: how many operator retries (QueueOp "retry") took effect; delivery/dispatcher.py.
OPERATOR_RETRIES = "operator_retries"
SUPPRESSIONS = "suppressions"  # meta key: entries in the suppression list
SHAPING = "shaping"  # meta key: the traffic shaping rules applied ({"text", "at_ms"})
DUE_BY_DOMAIN = "due_by_domain"  # meta key: the per-domain index's version, once complete
DUE_BY_DOMAIN_VERSION = 2  # 2: held messages are in it too (HELD_DUE)
HELD_DUE = 2**64 - 1  # a held message's due time in the per-domain index: never
DOMAIN_KEY_MAX = 400  # bytes of a domain in that index's keys
AUDIT_SEQ = "audit_seq"  # meta key: audit records written, the last one's sequence number
AUDIT_SCAN = 100_000  # records one audit listing reads at most
SUPPRESSION_SCAN = 100_000  # entries one list request reads at most
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
# In the state dir while its commits skip fsync: the boot id of the kernel that holds them.
UNSYNCED_MARKER = "unsynced-boot-id"
# The marker's text after a failed writeback: no boot id matches it (a rebuild at open).
WRITEBACK_FAILED = "writeback-failed"


class StateTxn:
    """Write access to the queue state inside one LMDB transaction (tick thread only)."""

    def __init__(self, store: QueueStore, txn: Any) -> None:
        self._s = store
        self._txn = txn

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        raw = self._txn.get(key.encode(), db=self._s._meta)
        return default if raw is None else unpack(raw)

    def put_meta(self, key: str, value: Any) -> None:
        self._txn.put(key.encode(), pack(value), db=self._s._meta)

    def applied_index(self) -> int:
        return int(self.get_meta("applied_index", 0))

    def set_applied_index(self, index: int) -> None:
        self.put_meta("applied_index", index)

    def _bump(self, state: MessageState, delta: int) -> None:
        key = COUNT_KEYS[state].decode()
        self.put_meta(key, int(self.get_meta(key, 0)) + delta)

    # -- messages -----------------------------------------------------------
    def get_message(self, queue_id: str) -> QueuedMessage | None:
        raw = self._txn.get(queue_id.encode(), db=self._s._msgs)
        return None if raw is None else self._s.decoded(bytes(raw), queue_id)

    def put_message(self, msg: QueuedMessage, old: QueuedMessage | None) -> None:
        """Insert or replace `old` (as stored), keeping the indexes and state counters in
        step. Only what changed is written: a claim or an outcome that keeps a message's
        due time and state rewrites neither its index keys nor the counters."""
        record = with_crc(pack(msg.to_record()))
        if old is None:  # a new message (an Enqueue): every key is new, nothing to compare
            self._put_record(msg, record)
            if not msg.hold:
                self._txn.put(_due_key(msg), b"", db=self._s._due)
            for key in _domain_due_keys(msg):
                self._txn.put(key, b"", db=self._s._due_by_domain)
            self._bump(msg.state(), +1)
            return
        if msg.recipients is old.recipients and (
            msg.queue_id,
            msg.hold,
            msg.next_attempt_ms,
            msg.attempts,
        ) == (old.queue_id, old.hold, old.next_attempt_ms, old.attempts):
            # A claim: the index keys and the state depend on nothing it changed.
            self._put_record(msg, record)
            return
        due, by_domain = _index_keys(msg)
        old_due, old_by_domain = _index_keys(old)
        self._unindex(old_due - due, old_by_domain - by_domain)
        self._put_record(msg, record)
        for key in due - old_due:
            self._txn.put(key, b"", db=self._s._due)
        for key in by_domain - old_by_domain:
            self._txn.put(key, b"", db=self._s._due_by_domain)
        if old.state() is not msg.state():
            self._bump(old.state(), -1)
            self._bump(msg.state(), +1)

    def _put_record(self, msg: QueuedMessage, record: bytes) -> None:
        self._txn.put(msg.queue_id.encode(), record, db=self._s._msgs)
        self._s.memo.put(msg.queue_id, record, msg)

    def delete_message(self, msg: QueuedMessage) -> None:
        self._unindex(*_index_keys(msg))
        self._bump(msg.state(), -1)
        self._txn.delete(msg.queue_id.encode(), db=self._s._msgs)
        self._s.memo.drop(msg.queue_id)
        self.delete_body(msg.body_key, msg.body_chunks, msg.size)

    def _unindex(self, due: set[bytes], by_domain: set[bytes]) -> None:
        for key in due:
            self._txn.delete(key, db=self._s._due)
        for key in by_domain:
            self._txn.delete(key, db=self._s._due_by_domain)

    # -- bodies -------------------------------------------------------------
    def put_body_chunk(self, body_key: str, seq: int, data: bytes) -> None:
        self._txn.put(_body_key(body_key, seq), with_crc(data), db=self._s._body)
        self._s.body_bytes_held += len(data)

    def put_deflated_body(self, body_key: str, stream: bytes, size: int) -> None:
        """A whole body kept as the zlib `stream` of its `size` bytes (compression.py).

        Its record is marked (`storage.with_crc`, the CRC stored inverted): a release that
        does not know the mark refuses the record as corrupt instead of sending the
        stream as mail. `body_bytes_held` counts the body's `size`, as its delete does.
        """
        self._txn.put(_body_key(body_key, 0), with_crc(stream, marked=True), db=self._s._body)
        self._s.body_bytes_held += size

    def has_body_chunk(self, body_key: str, seq: int) -> bool:
        # A cursor finds the key without copying the value (a chunk of up to a MiB).
        with self._txn.cursor(db=self._s._body) as cur:
            return bool(cur.set_key(_body_key(body_key, seq)))

    def read_body(self, body_key: str, chunks: int, size: int) -> bytes:
        """The body of `size` bytes, copied once: each chunk's CRC is checked on a view of
        it (in a `buffers` transaction, a view of the map itself) and the views are
        joined; a deflated body (`put_deflated_body`) is inflated instead, bounded by
        `size`."""
        parts = []
        for view, deflated, what in self._body_views(body_key, chunks):
            if deflated:
                return inflate(view, size, what)
            parts.append(view)
        return b"".join(parts)

    def read_head(self, body_key: str, chunks: int, size: int, limit: int) -> bytes:
        """The body's first bytes, up to its header's end or `limit` (at least those): only
        the chunks that hold them are read, and a deflated body is inflated that far."""
        parts = []
        held = 0
        for view, deflated, _ in self._body_views(body_key, chunks):
            if deflated:
                return inflate_head(view, min(limit, size))
            parts.append(view)
            held += len(view)
            if held >= limit:
                break
        return b"".join(parts)

    def _body_views(self, body_key: str, chunks: int) -> Iterator[tuple[memoryview, bool, str]]:
        """(CRC-checked view, deflated?, what it is) of each chunk in order; only a body
        of one chunk may be deflated."""
        for seq in range(chunks):
            what = f"body {body_key} chunk {seq}"
            raw = self._txn.get(_body_key(body_key, seq), db=self._s._body)
            if raw is None:
                raise CorruptDataError(f"{what} missing")
            view, deflated = crc_view(raw, what)
            if deflated and chunks != 1:
                raise CorruptDataError(f"{what}: a deflated chunk of a staged body")
            yield view, deflated, what

    def delete_body(self, body_key: str, chunks: int, size: int = 0) -> None:
        """`size`: the body's bytes, for `body_bytes_held` (0 where unknown: an estimate)."""
        for seq in range(chunks):
            self._txn.delete(_body_key(body_key, seq), db=self._s._body)
        self._s.body_bytes_held -= size

    # -- staged uploads (large bodies arriving as chunks) --------------------
    def note_upload(self, upload_id: str, created_ms: int) -> None:
        key = upload_id.encode()
        if self._txn.get(key, db=self._s._uploads) is None:
            self._txn.put(key, U64.pack(created_ms), db=self._s._uploads)
            self._txn.put(U64.pack(created_ms) + key, b"", db=self._s._uploads_by_time)

    def finish_upload(self, upload_id: str) -> None:
        key = upload_id.encode()
        raw = self._txn.get(key, db=self._s._uploads)
        if raw is not None:
            self._txn.delete(key, db=self._s._uploads)
            self._txn.delete(bytes(raw) + key, db=self._s._uploads_by_time)

    def expire_uploads(self, older_than_ms: int, limit: int) -> int:
        """Drop staged chunks of uploads never enqueued (client gave up); bounded work."""
        doomed = self._expire(self._s._uploads_by_time, self._s._uploads, older_than_ms, limit)
        for upload_id in doomed:
            bcur = self._txn.cursor(db=self._s._body)
            prefix = upload_id + b"\0"
            if bcur.set_range(prefix):
                while bcur.key().startswith(prefix):
                    if not bcur.delete():
                        break
        return len(doomed)

    def _expire(self, by_time: Any, primary: Any, older_than_ms: int, limit: int) -> list[bytes]:
        """Delete up to `limit` keys whose time-index entry (ms || key) is older; return them."""
        doomed: list[bytes] = []
        for key, _ in self._txn.cursor(db=by_time):
            if U64.unpack(key[:8])[0] >= older_than_ms or len(doomed) >= limit:
                break
            doomed.append(bytes(key))
        for key in doomed:
            self._txn.delete(key, db=by_time)
            self._txn.delete(key[8:], db=primary)
        return [k[8:] for k in doomed]

    # -- idempotency --------------------------------------------------------
    def get_idem(self, key: bytes) -> str | None:
        raw = self._txn.get(key, db=self._s._idem)
        return None if raw is None else str(unpack(raw)[0])

    def put_idem(self, key: bytes, queue_id: str, at_ms: int) -> None:
        self._txn.put(key, pack([queue_id, at_ms]), db=self._s._idem)
        self._txn.put(U64.pack(at_ms) + key, b"", db=self._s._idem_by_time)

    def expire_idem(self, older_than_ms: int, limit: int) -> int:
        return len(self._expire(self._s._idem_by_time, self._s._idem, older_than_ms, limit))

    # -- the suppression list (spool/suppression.py) ----------------------------
    # -- the audit trail (admin/audit.py) ---------------------------------------
    def put_audit(self, at_ms: int, record: dict[str, Any]) -> None:
        """Keyed by time, then a sequence number (several in one millisecond)."""
        seq = int(self.get_meta(AUDIT_SEQ, 0)) + 1
        self.put_meta(AUDIT_SEQ, seq)
        self._txn.put(U64.pack(at_ms) + U64.pack(seq), pack(record), db=self._s._audit)

    def expire_audit(self, older_than_ms: int, limit: int) -> int:
        if older_than_ms <= 0:
            return 0
        cur = self._txn.cursor(db=self._s._audit)
        dropped = 0
        while dropped < limit and cur.first():
            if U64.unpack(bytes(cur.key())[:8])[0] >= older_than_ms:
                break
            cur.delete()
            dropped += 1
        return dropped

    def get_suppression(self, raw_key: bytes) -> Entry | None:
        raw = self._txn.get(raw_key, db=self._s._suppress)
        if raw is None:
            return None
        scope, target = split_key(raw_key)
        return Entry.from_record(target, scope, unpack(raw))

    def put_suppression(self, entry: Entry) -> None:
        """Add or replace (a newer entry for the same target and scope wins)."""
        if not self.delete_suppression(entry.scope, entry.target):
            self.put_meta(SUPPRESSIONS, int(self.get_meta(SUPPRESSIONS, 0)) + 1)
        raw_key = suppression_key(entry.scope, entry.target)
        self._txn.put(raw_key, pack(entry.to_record()), db=self._s._suppress)
        if entry.expires_ms:
            self._txn.put(U64.pack(entry.expires_ms) + raw_key, b"", db=self._s._suppress_exp)

    def delete_suppression(self, scope: str, target: str, count: bool = False) -> bool:
        raw_key = suppression_key(scope, target)
        old = self.get_suppression(raw_key)
        if old is None:
            return False
        self._txn.delete(raw_key, db=self._s._suppress)
        if old.expires_ms:
            self._txn.delete(U64.pack(old.expires_ms) + raw_key, db=self._s._suppress_exp)
        if count:
            self.put_meta(SUPPRESSIONS, int(self.get_meta(SUPPRESSIONS, 0)) - 1)
        return True

    def expire_suppressions(self, now_ms: int, limit: int) -> int:
        gone = len(self._expire(self._s._suppress_exp, self._s._suppress, now_ms, limit))
        if gone:
            self.put_meta(SUPPRESSIONS, int(self.get_meta(SUPPRESSIONS, 0)) - gone)
        return gone

    def suppressed(self, recipient: str, sender_domain: str, now_ms: int) -> Entry | None:
        """The entry that suppresses this recipient for this sender, if any."""
        for raw_key in lookup_keys(recipient, sender_domain):
            entry = self.get_suppression(raw_key)
            if entry is not None and not entry.expired(now_ms):
                return entry
        return None

    def list_suppressions(
        self, limit: int, after: str = "", scope: str | None = None, source: str = ""
    ) -> list[Entry]:
        """Entries in (scope, target) order after the key `after` ("scope\0target"), at
        most `limit`, reading at most SUPPRESSION_SCAN entries (filters may skip)."""
        out: list[Entry] = []
        cur = self._txn.cursor(db=self._s._suppress)
        start = after.encode() + b"\0" if after else (f"{scope}\0".encode() if scope else b"")
        if not cur.set_range(start):
            return out
        for n, (raw_key, raw) in enumerate(cur.iternext()):
            if len(out) >= limit or n >= SUPPRESSION_SCAN:
                break
            s, target = split_key(bytes(raw_key))
            if scope is not None and s != scope:
                if s > scope:
                    break
                continue
            entry = Entry.from_record(target, s, unpack(raw))
            if not source or entry.source == source:
                out.append(entry)
        return out


def current_boot_id() -> str | None:
    """This kernel's boot id (Linux), or None where there is none."""
    try:
        return BOOT_ID_FILE.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _decode_message(raw: bytes, queue_id: str) -> QueuedMessage:
    try:
        return QueuedMessage.from_record(unpack(check_crc(raw, f"message {queue_id}")))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptDataError(f"message {queue_id}: undecodable record: {exc}") from exc


def _due_key(msg: QueuedMessage) -> bytes:
    return U64.pack(msg.next_attempt_ms) + msg.queue_id.encode()


def _index_keys(msg: QueuedMessage) -> tuple[set[bytes], set[bytes]]:
    """A message's keys in the due index (none while held) and in the per-domain one."""
    return (set() if msg.hold else {_due_key(msg)}), _domain_due_keys(msg)


def _domain_due_keys(msg: QueuedMessage) -> set[bytes]:
    """One key per domain of a pending recipient: domain NUL due-time queue-id.

    A held message is in it too, never due (HELD_DUE): the index also answers "every
    message for this domain" (`domain_id_page`). Domains come lowercased from the
    address; one longer than DOMAIN_KEY_MAX bytes is cut there (LMDB keys are at most
    511 bytes). The index only finds candidates: the reader decodes the message and takes
    its destinations from the message itself.
    """
    tail = U64.pack(HELD_DUE) + msg.queue_id.encode() if msg.hold else _due_key(msg)
    return {
        domain_key(r.address.rpartition("@")[2]) + b"\0" + tail
        for r in msg.recipients
        if r.state is RcptState.PENDING
    }


def domain_key(domain: str) -> bytes:
    """A recipient domain as the per-domain due index spells it."""
    return domain.lower().encode("utf-8", "surrogateescape")[:DOMAIN_KEY_MAX]


def _body_key(body_key: str, seq: int) -> bytes:
    return body_key.encode() + b"\0" + U32.pack(seq)


class QueueStore:
    """The queue state in LMDB. See the module docstring for the threading contract."""

    def __init__(
        self,
        path: Path,
        map_size_mb: int,
        boot_id: Callable[[], str | None] = current_boot_id,
    ) -> None:
        self.path = path
        self._map_size = map_size_mb * 1024 * 1024  # configured: what fill is measured against
        self._env_map_size = self._map_size  # grown past it only to apply (grow_for_apply)
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()  # sync_state against close, not against readers
        # Body bytes applied less body bytes deleted since the store opened (tick thread):
        # how much a writeback of the state has to write, for node.watch_state_writeback.
        # Deleted bodies' pages are reused by later ones before a writeback (LMDB reuses
        # freed pages), so mail delivered soon after it came costs a writeback little.
        self.body_bytes_held = 0
        self.memo = RecordMemo()  # messages by their record's bytes: decoded once
        self._untrusted = False  # a writeback failed: never removes the marker
        self._txn: Any = None
        self._commits = 0
        self._boot_id = boot_id()
        self.discarded_unsynced = self._discard_if_os_restarted()
        self._open()

    def _discard_if_os_restarted(self) -> bool:
        """Delete a state whose unsynced commits a kernel crash may have lost or torn.

        The marker names the boot whose page cache held them; under that same
        boot (a killed process) the state is whole. RaftNode rebuilds it from
        snapshot.bin and the journal, which a state commit never runs ahead of.
        """
        marker = self.path / UNSYNCED_MARKER
        try:
            recorded = marker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptDataError(f"queue store marker {marker}: {exc}") from exc
        if self._boot_id is not None and recorded == self._boot_id:
            return False
        if recorded == WRITEBACK_FAILED:
            why = ": a writeback of its commits failed before the node stopped"
        else:
            why = (
                f" holds commits never fsynced (boot {recorded or '?'}) and the machine has "
                f"restarted since (boot {self._boot_id or 'unknown'})"
            )
        log.warning(
            "queue state %s%s: discarding it; it is rebuilt from snapshot.bin and the Raft log",
            self.path,
            why,
        )
        shutil.rmtree(self.path)
        fsync_path(self.path.parent)
        return True

    @property
    def unsynced(self) -> bool:
        """Whether state commits skip fsync (see the module docstring)."""
        return self._boot_id is not None

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.unsynced:
            # Durable before the first commit that is not: see _discard_if_os_restarted.
            self._write_marker(str(self._boot_id))
        self._env = open_env(
            self.path, self._env_map_size, 16, "queue store", sync=not self.unsynced
        )
        self._closed = False
        env = self._env
        # A map grown to apply before a restart opens at least as big as its data.
        self._env_map_size = max(self._env_map_size, int(env.info()["map_size"]))
        self._meta = env.open_db(b"meta")
        self._msgs = env.open_db(b"msgs")
        self._body = env.open_db(b"body")
        self._due = env.open_db(b"due")
        self._due_by_domain = env.open_db(b"due_by_domain")
        self._idem = env.open_db(b"idem")
        self._idem_by_time = env.open_db(b"idem_by_time")
        self._uploads = env.open_db(b"uploads")
        self._uploads_by_time = env.open_db(b"uploads_by_time")
        self._suppress = env.open_db(b"suppress")
        self._suppress_exp = env.open_db(b"suppress_by_expiry")
        self._audit = env.open_db(b"audit")
        self._index_domains()
        self._fill = self._measure_fill()

    def _index_domains(self) -> None:
        """Build the per-domain due index of a state (or snapshot) written without it."""
        with self._env.begin(write=True) as txn:
            done = txn.get(DUE_BY_DOMAIN.encode(), db=self._meta)
            if done is not None and unpack(done) == DUE_BY_DOMAIN_VERSION:
                return
            txn.drop(self._due_by_domain, delete=False)
            indexed = 0
            for qid, raw in txn.cursor(db=self._msgs):
                msg = _decode_message(bytes(raw), bytes(qid).decode())
                for key in _domain_due_keys(msg):
                    txn.put(key, b"", db=self._due_by_domain)
                indexed += 1
            txn.put(DUE_BY_DOMAIN.encode(), pack(DUE_BY_DOMAIN_VERSION), db=self._meta)
        if indexed:
            log.info("queue state %s: indexed %d messages by recipient domain", self.path, indexed)

    def _write_marker(self, text: str) -> None:
        with open(self.path / UNSYNCED_MARKER, "w", encoding="ascii") as fh:
            fh.write(f"{text}\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(self.path)

    def _mark_untrusted(self) -> None:
        self._untrusted = True
        try:
            self._write_marker(WRITEBACK_FAILED)
        except OSError as exc:
            log.error("queue state %s: cannot mark it for a rebuild: %s", self.path, exc)

    def sync_state(self) -> None:
        """Write unsynced commits back now; CorruptDataError if the disk refused them.

        Any thread; the tick thread's commits go on meanwhile. On an error the marker
        makes the next open discard the state (module docstring, W27): the caller
        must stop the node, as the state may already read back wrong.
        """
        with self._sync_lock:
            if not self.unsynced or self._closed:
                return
            try:
                self._env.sync(True)
            except LmdbError as exc:
                self._mark_untrusted()
                raise CorruptDataError(
                    f"queue state {self.path}: writing its commits back to disk failed ({exc}); "
                    "it is rebuilt from snapshot.bin and the Raft log at the next start"
                ) from exc

    # -- the tick thread's write path ----------------------------------------
    def apply_txn(self) -> StateTxn:
        """The open write transaction of this tick (opened on first use)."""
        if self._txn is None:
            self._txn = self._env.begin(write=True)
        return StateTxn(self, self._txn)

    def commit_apply(self, refresh_fill: bool = False) -> None:
        """Commit everything applied since the last commit (no fsync: module docstring).

        The fill ratio is measured again every `FILL_REFRESH_COMMITS` commits, or
        now with `refresh_fill` (a follower commits only every ~25 ms while busy:
        eight of those let ingress accept on a fill ratio 200 ms old, and a 6 MB
        map filled inside apply in the disk-full fault test).
        """
        if self._txn is None:
            return
        txn, self._txn = self._txn, None
        try:
            txn.commit()
        except LmdbMapFullError as exc:
            self._fill = 1.0
            raise StateMapFullError("queue store map is full") from exc
        except LmdbError as exc:
            raise storage_error("queue store", exc) from exc
        self._commits += 1
        if refresh_fill or self._commits % FILL_REFRESH_COMMITS == 0:
            self._fill = self._measure_fill()

    def abort_apply(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    @staticmethod
    def map_filled(exc: BaseException) -> bool:
        """Whether `exc` is this store's map filling inside apply or its commit."""
        return isinstance(exc, (LmdbMapFullError, StateMapFullError))

    def grow_for_apply(self) -> bool:
        """Grow the map by `APPLY_HEADROOM_STEP` of the configured size; False at the cap.

        Tick thread, after `abort_apply`, and never while a snapshot copy holds a read
        transaction (LMDB remaps the file: another thread's open reader would fault).
        Readers on other threads take `_lock`, held here.
        """
        limit = int(self._map_size * APPLY_HEADROOM_MAX)
        if self._txn is not None or self._env_map_size >= limit:
            return False
        with self._lock:
            grown = min(limit, self._env_map_size + int(self._map_size * APPLY_HEADROOM_STEP))
            self._env.set_mapsize(grown)
            self._env_map_size = grown
        return True

    @property
    def map_size_bytes(self) -> int:
        """The map's size now: the configured size, or more after `grow_for_apply`."""
        return self._env_map_size

    def decoded(self, raw: bytes, queue_id: str) -> QueuedMessage:
        """The message of the record `raw` (as stored), decoded only when `memo` does
        not hold exactly these bytes (any thread)."""
        msg = self.memo.get(queue_id, raw)
        if msg is None:
            msg = _decode_message(raw, queue_id)
            self.memo.put(queue_id, raw, msg)
        return msg

    # -- readers (any thread) ------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[StateTxn]:
        with self._lock, self._env.begin(write=False) as txn:
            yield StateTxn(self, txn)

    def applied_index(self) -> int:
        with self.reader() as r:
            return r.applied_index()

    def counts(self) -> dict[str, int]:
        with self.reader() as r:
            return {s.value: int(r.get_meta(COUNT_KEYS[s].decode(), 0)) for s in MessageState}

    def operator_retries(self) -> int:
        with self.reader() as r:
            return int(r.get_meta(OPERATOR_RETRIES, 0))

    def suppressed(self, recipient: str, sender_domain: str, now_ms: int) -> Entry | None:
        with self.reader() as r:
            return r.suppressed(recipient, sender_domain, now_ms)

    def shaping(self) -> dict[str, Any]:
        """The traffic shaping rules as applied ({"text", "at_ms"}), {} when none were."""
        with self.reader() as r:
            return dict(r.get_meta(SHAPING, {}))

    def suppression_count(self) -> int:
        with self.reader() as r:
            return int(r.get_meta(SUPPRESSIONS, 0))

    def audit_records(
        self, since_ms: int, principal: str = "", limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Audit records from `since_ms` on, oldest first; `principal`: that one's only.
        Reads at most AUDIT_SCAN records."""
        out: list[dict[str, Any]] = []
        with self._lock, self._env.begin(write=False) as txn:
            cur = txn.cursor(db=self._audit)
            if not cur.set_range(U64.pack(max(0, since_ms))):
                return out
            for read, (_, raw) in enumerate(cur.iternext(), 1):
                if read > AUDIT_SCAN or len(out) >= limit:
                    break
                record = unpack(raw)
                if isinstance(record, dict) and principal in ("", record.get("principal")):
                    out.append(record)
        return out

    def id_page(self, after: str, limit: int) -> list[str]:
        """Up to `limit` queue ids after `after` ("" from the start), in id order: keys
        only, one short read (admin/selection.py pages a whole queue with it)."""
        out: list[str] = []
        with self._lock, self._env.begin(write=False) as txn:
            cur = txn.cursor(db=self._msgs)
            start = after.encode() + b"\0" if after else b""
            if not cur.set_range(start):
                return out
            for key in cur.iternext(values=False):
                out.append(bytes(key).decode())
                if len(out) >= limit:
                    break
        return out

    def domain_id_page(self, domain: str, after: bytes, limit: int) -> tuple[list[str], bytes]:
        """Up to `limit` ids of messages with a pending recipient in `domain`, in the
        per-domain index's order after its key `after` (b"" from the start), and the
        last key read (the next page's `after`; b"" when the domain's part ended)."""
        prefix = domain_key(domain) + b"\0"
        out: list[str] = []
        last = b""
        with self._lock, self._env.begin(write=False) as txn:
            cur = txn.cursor(db=self._due_by_domain)
            if not cur.set_range(after + b"\0" if after else prefix):
                return out, b""
            for key in cur.iternext(values=False):
                key = bytes(key)
                if not key.startswith(prefix):
                    return out, b""
                out.append(key[len(prefix) + 8 :].decode())
                last = key
                if len(out) >= limit:
                    return out, last
        return out, b""

    def get_message(self, queue_id: str) -> QueuedMessage | None:
        with self.reader() as r:
            return r.get_message(queue_id)

    def messages(self, queue_ids: list[str]) -> list[QueuedMessage]:
        """The messages of `queue_ids` still queued, in one read."""
        with self.reader() as r:
            found = (r.get_message(qid) for qid in queue_ids)
            return [m for m in found if m is not None]

    def read_body(self, msg: QueuedMessage) -> bytes:
        # buffers: the chunks are views of the map until joined (valid in the txn only).
        with self._lock, self._env.begin(write=False, buffers=True) as txn:
            return StateTxn(self, txn).read_body(msg.body_key, msg.body_chunks, msg.size)

    def read_head(self, msg: QueuedMessage, limit: int) -> bytes:
        """`StateTxn.read_head`: what `queue show` reads a header from, not the body."""
        with self._lock, self._env.begin(write=False, buffers=True) as txn:
            return StateTxn(self, txn).read_head(msg.body_key, msg.body_chunks, msg.size, limit)

    def list_messages(self, limit: int, state: MessageState | None = None) -> list[QueuedMessage]:
        out: list[QueuedMessage] = []
        with self._lock, self._env.begin(write=False) as txn:
            for _, raw in txn.cursor(db=self._msgs):
                msg = _decode_message(bytes(raw), "?")
                if state is None or msg.state() is state:
                    out.append(msg)
                    if len(out) >= limit:
                        break
        return out

    def domain_counts(self, limit: int) -> dict[str, int]:
        """Pending recipients' domains over the first `limit` messages (for metrics)."""
        counts: dict[str, int] = {}
        for msg in self.list_messages(limit):
            for domain in {r.address.rpartition("@")[2].lower() for r in msg.recipients}:
                counts[domain] = counts.get(domain, 0) + 1
        return counts

    def due_messages(self, now_ms: int, limit: int) -> list[QueuedMessage]:
        """Messages whose next attempt is due, oldest due first."""
        return list(self.iter_due(now_ms, limit))

    def iter_due(
        self,
        now_ms: int,
        limit: int,
        skip: Container[str] = (),
        max_examined: int | None = None,
    ) -> Generator[QueuedMessage, None, None]:
        """Due messages one at a time, oldest due first, decoded only when asked for; ids
        in `skip` passed over.

        The dispatcher skips the messages it is delivering (the oldest due) and
        those it knows to be for a destination with enough claimed, and stops
        once its free slots are filled: decoding a whole batch on every scan was
        a tenth of the leader's CPU in the end-to-end bench. At most `limit`
        messages are yielded and `max_examined` index entries read. Consume it
        without awaiting in between: it holds a read transaction.
        """
        # Keys only, and the time compared as the key's first 8 bytes (big-endian, so
        # they sort as the number): the dispatcher's scans pass over the messages it has
        # in flight at the index's head every time.
        end = U64.pack(now_ms + 1)
        with self._lock, self._env.begin(write=False) as txn:
            given = 0
            keys = txn.cursor(db=self._due).iternext(keys=True, values=False)
            for examined, key in enumerate(keys, 1):
                if key >= end or given >= limit:
                    break
                if max_examined is not None and examined > max_examined:
                    break
                raw_id = key[8:]
                qid = raw_id.decode()
                if qid not in skip:
                    raw = txn.get(raw_id, db=self._msgs)
                    if raw is not None:
                        given += 1
                        yield self.decoded(bytes(raw), qid)

    def iter_due_by_domain(
        self,
        now_ms: int,
        limit: int,
        skip: Container[str],
        max_examined: int,
        passed: Callable[[str], bool],
        start_after: str = "",
        stopped_at: list[str] | None = None,
    ) -> Generator[QueuedMessage, None, None]:
        """Due messages domain by domain (round robin), each domain's oldest first.

        A domain for which `passed(domain)` holds (its destination has enough claimed, or
        its shaping site is paced or suspended) costs one seek, however long its backlog:
        the scan jumps to the next domain. `passed` is asked again after each message
        yielded (the caller's plan may just have filled that domain). Domains come in name
        order starting after `start_after`, wrapping around once; `stopped_at` is set to
        the domain the scan stopped in, for the next scan to start after it (every
        domain gets its turn however short the scans). A message for several domains is
        yielded once. Reads at most `max_examined` index entries and domain seeks
        together; yields at most `limit`. Consume it without awaiting in between.
        """
        start = domain_key(start_after) if start_after else b""
        passes = [(start + b"\x01", None), (b"", start)] if start else [(b"", None)]
        with self._lock, self._env.begin(write=False) as txn:
            budget = [max_examined]
            given: set[str] = set()
            cur = txn.cursor(db=self._due_by_domain)
            try:
                for lo, hi in passes:
                    for msg in self._domain_pass(txn, cur, lo, hi, now_ms, skip, passed, budget):
                        if msg.queue_id not in given:
                            given.add(msg.queue_id)
                            yield msg
                            if len(given) >= limit:
                                return
                    if budget[0] <= 0:
                        return
                cur = None  # every domain seen: the next scan starts at the first
            finally:
                if stopped_at is not None:
                    stopped_at[:] = [] if cur is None else [self._domain_at(cur)]

    @staticmethod
    def _domain_at(cur: Any) -> str:
        key = bytes(cur.key()) if cur.key() else b""
        return key.partition(b"\0")[0].decode("utf-8", "surrogateescape")

    def _domain_pass(
        self,
        txn: Any,
        cur: Any,
        lo: bytes,
        hi: bytes | None,
        now_ms: int,
        skip: Container[str],
        passed: Callable[[str], bool],
        budget: list[int],
    ) -> Generator[QueuedMessage, None, None]:
        """One pass of iter_due_by_domain over the domains from `lo` up to `hi` (included)."""
        found = cur.set_range(lo) if lo else cur.first()
        while found and budget[0] > 0:
            key = bytes(cur.key())
            dkey, _, tail = key.partition(b"\0")
            if hi is not None and dkey > hi:
                return
            budget[0] -= 1
            domain = dkey.decode("utf-8", "surrogateescape")
            if passed(domain) or U64.unpack(tail[:8])[0] > now_ms:
                found = cur.set_range(dkey + b"\x01")  # the next domain
                continue
            qid = tail[8:].decode()
            if qid not in skip:
                raw = txn.get(tail[8:], db=self._msgs)
                if raw is not None:
                    yield self.decoded(bytes(raw), qid)
            found = cur.next()

    def fill_ratio(self) -> float:
        """Pages in use over the map size, as of the last few commits (cheap: no I/O).

        Ingress asks on every DATA; the tick thread refreshes it every
        `FILL_REFRESH_COMMITS` commits instead of every caller opening a transaction.
        """
        return self._fill

    def used_bytes(self) -> int:
        """Bytes of live data, as of the last fill measurement (cheap: no I/O)."""
        return int(self._fill * self._map_size)

    def _measure_fill(self) -> float:
        """Pages in use by live data over the map size (freed pages count as free)."""
        with self._lock, self._env.begin(write=False) as txn:
            pages = 0
            psize = 4096
            for db in self._all_dbs():
                st = txn.stat(db)
                psize = st["psize"]
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return float(pages * psize) / float(self._map_size)

    def _all_dbs(self) -> tuple[Any, ...]:
        return (
            self._meta,
            self._msgs,
            self._body,
            self._due,
            self._due_by_domain,
            self._idem,
            self._idem_by_time,
            self._uploads,
            self._uploads_by_time,
            self._suppress,
            self._suppress_exp,
            self._audit,
        )

    # -- snapshots -----------------------------------------------------------
    def copy_into(self, fd: int, txn: Any = None) -> None:
        """Write a consistent, compacted copy of the state to `fd` from its current
        position (a pipe or a file); not synced.

        With `txn` (from `snapshot_txn()`), the copy is the state as of that read
        transaction, and may run on another thread while applies go on (the copy
        releases the GIL). raft/snapshot_file.py streams it through a pipe into the
        snapshot, checksumming and syncing it in slices on the way.
        """
        if txn is None:
            self.commit_apply()
        self._env.copyfd(fd, compact=True, txn=txn)

    def snapshot_txn(self) -> Any:
        """Commit this tick's applies and open a read transaction on exactly that state.

        LMDB readers see a fixed version while writers go on (pages they still
        see are not reused until they end), so a snapshot can be copied from it
        on another thread. The caller must abort it, and before `replace_from`.
        """
        self.commit_apply()
        return self._env.begin(write=False)

    def replace_from(self, data_file: Path) -> None:
        """Swap the whole state for a snapshot copy (install-snapshot path)."""
        with self._lock, self._sync_lock:
            self.abort_apply()
            self._env.close()
            staging = self.path.with_name(self.path.name + ".new")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copyfile(data_file, staging / "data.mdb")
            fsync_path(staging / "data.mdb")
            old = self.path.with_name(self.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.path, old)
            os.rename(staging, self.path)
            fsync_path(self.path.parent)
            shutil.rmtree(old, ignore_errors=True)
            self._open()

    def close(self) -> None:
        """Sync (a clean close leaves nothing to rebuild after a reboot) and close."""
        with self._lock, self._sync_lock:
            if self._closed:
                return
            self._closed = True
            self.abort_apply()
            trusted = self.unsynced and not self._untrusted
            if trusted:
                try:
                    self._env.sync(True)
                except LmdbError as exc:
                    trusted = False
                    log.error("queue state %s: writeback failed at close: %s", self.path, exc)
                    self._mark_untrusted()
            self._env.close()
            if trusted:
                (self.path / UNSYNCED_MARKER).unlink(missing_ok=True)
                fsync_path(self.path)
