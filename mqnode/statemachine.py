"""QueueStateMachine: applies committed Raft entries to the LMDB queue state.

Contract (hashicorp/raft fsm.go: "Apply must be deterministic"):
* `apply(index, entry, txn)` reads nothing but the entry and the store: no
  clock, socket or randomness. Ids and timestamps were made before submit.
* Idempotent by index: an entry at or below the stored applied index is
  skipped, so replaying the journal after a restart changes nothing.
* Invalid input (undecodable entry, missing chunks) is rejected the same way
  on every node and recorded as a result; it never raises past here.

Results (one per command in the entry):
    ("queued", queue_id) | ("duplicate", queue_id) | ("rejected", reason) | ("ok", "")
"""

from __future__ import annotations

import logging

from .commands import (
    Announce,
    Command,
    Enqueue,
    PutChunk,
    RecordOutcome,
    decode_entry,
)
from .errors import CodecError
from .model import Outcome, QueuedMessage, RcptState, Recipient
from .store import StateTxn

log = logging.getLogger(__name__)

Result = tuple[str, str]

IDEM_WINDOW_MS = 24 * 3600 * 1000
UPLOAD_TTL_MS = 3600 * 1000
GC_BATCH = 16


MAX_ID_CHARS = 64
MAX_KEY_BYTES = 64
MAX_CHUNKS = 1_000_000
_OUTCOMES = {o.value for o in Outcome}


def _bad_id(value: str) -> bool:
    return not 0 < len(value) <= MAX_ID_CHARS or not value.isascii() or "\0" in value


def invalid(cmd: Command) -> str | None:
    """Why a well-typed command cannot be applied (LMDB key limits, ranges), or None.

    Checked before any write, so a rejected command leaves no partial state.
    """
    if isinstance(cmd, Enqueue):
        if _bad_id(cmd.queue_id):
            return "Enqueue: bad queue id"
        if not 0 < len(cmd.idem_key) <= MAX_KEY_BYTES:
            return "Enqueue: bad idempotency key"
        if cmd.body is None and (_bad_id(cmd.upload_id) or not 0 < cmd.chunks <= MAX_CHUNKS):
            return "Enqueue: bad upload reference"
        if cmd.received_ms < 0 or cmd.body_size < 0:
            return "Enqueue: negative time or size"
    elif isinstance(cmd, PutChunk):
        if _bad_id(cmd.upload_id) or not 0 <= cmd.seq < MAX_CHUNKS or cmd.created_ms < 0:
            return "PutChunk: bad upload id or sequence"
    elif isinstance(cmd, RecordOutcome):
        if _bad_id(cmd.queue_id):
            return "RecordOutcome: bad queue id"
    elif isinstance(cmd, Announce) and not 0 < len(cmd.raft_addr) <= 255:
        return "Announce: bad address"
    return None


class QueueStateMachine:
    def apply(self, index: int, entry: bytes, txn: StateTxn) -> list[Result] | None:
        """Apply one log entry; None if it was applied before (replay)."""
        applied = txn.applied_index()
        if index <= applied:
            return None
        try:
            commands = decode_entry(entry)
        except CodecError as exc:
            log.error("entry %d rejected: %s", index, exc)
            txn.set_applied_index(index)
            return [("rejected", f"undecodable entry: {exc}")]
        results = [self._apply_one(cmd, txn) for cmd in commands]
        txn.set_applied_index(index)
        return results

    def _apply_one(self, cmd: Command, txn: StateTxn) -> Result:
        problem = invalid(cmd)
        if problem is not None:
            log.error("command rejected: %s", problem)
            return ("rejected", problem)
        if isinstance(cmd, Enqueue):
            return self._enqueue(cmd, txn)
        if isinstance(cmd, PutChunk):
            txn.note_upload(cmd.upload_id, cmd.created_ms)
            txn.put_body_chunk(cmd.upload_id, cmd.seq, cmd.data)
            return ("ok", "")
        if isinstance(cmd, Announce):
            nodes = dict(txn.get_meta("nodes", {}))
            nodes[cmd.raft_addr] = {
                "node_id": cmd.node_id,
                "smtp_addr": cmd.smtp_addr,
                "admin_addr": cmd.admin_addr,
                "term": cmd.term,
            }
            txn.put_meta("nodes", nodes)
            return ("ok", "")
        if isinstance(cmd, RecordOutcome):
            return self._record_outcome(cmd, txn)
        raise AssertionError(f"unhandled command {cmd!r}")

    def _enqueue(self, cmd: Enqueue, txn: StateTxn) -> Result:
        txn.expire_idem(cmd.received_ms - IDEM_WINDOW_MS, GC_BATCH)
        txn.expire_uploads(cmd.received_ms - UPLOAD_TTL_MS, GC_BATCH)
        existing = txn.get_idem(cmd.idem_key)
        if existing is not None:
            if cmd.upload_id and cmd.upload_id != existing:
                txn.delete_body(cmd.upload_id, cmd.chunks)
                txn.finish_upload(cmd.upload_id)
            return ("duplicate", existing)
        if txn.get_message(cmd.queue_id) is not None:
            return ("duplicate", cmd.queue_id)
        if not cmd.recipients:
            return ("rejected", "no recipients")
        if cmd.body is not None:
            body_key, chunks = cmd.queue_id, 1
            txn.put_body_chunk(body_key, 0, cmd.body)
        else:
            body_key, chunks = cmd.upload_id, cmd.chunks
            missing = [s for s in range(chunks) if not txn.has_body_chunk(body_key, s)]
            if missing:
                return ("rejected", f"upload {body_key} misses chunks {missing[:5]}")
            txn.finish_upload(body_key)
        msg = QueuedMessage(
            queue_id=cmd.queue_id,
            received_ms=cmd.received_ms,
            mail_from=cmd.mail_from,
            recipients=tuple(Recipient(r) for r in cmd.recipients),
            size=cmd.body_size,
            message_id=cmd.message_id,
            body_key=body_key,
            body_chunks=chunks,
            body_sha256=cmd.body_sha256,
            client=cmd.client,
            accepted_by=cmd.node_id,
            next_attempt_ms=cmd.received_ms,
        )
        txn.put_message(msg, None)
        txn.put_idem(cmd.idem_key, cmd.queue_id, cmd.received_ms)
        return ("queued", cmd.queue_id)

    def _record_outcome(self, cmd: RecordOutcome, txn: StateTxn) -> Result:
        msg = txn.get_message(cmd.queue_id)
        if msg is None:
            return ("rejected", "no such message")
        rcpts = list(msg.recipients)
        for idx, outcome, reply in cmd.results:
            if not 0 <= idx < len(rcpts) or rcpts[idx].state is not RcptState.PENDING:
                continue
            r = rcpts[idx]
            if outcome not in _OUTCOMES:
                continue
            new_state = {
                Outcome.DELIVERED.value: RcptState.DELIVERED,
                Outcome.BOUNCED.value: RcptState.BOUNCED,
            }.get(outcome, RcptState.PENDING)
            rcpts[idx] = Recipient(r.address, new_state, r.attempts + 1, reply)
        # Derived, not incremented: one attempt may be recorded by several commands
        # (results split to keep entries small) and must count once.
        updated = msg.with_changes(
            recipients=tuple(rcpts),
            attempts=max(r.attempts for r in rcpts),
            next_attempt_ms=cmd.next_attempt_ms,
        )
        if updated.complete:
            txn.delete_message(msg)
            return ("ok", "complete")
        txn.put_message(updated, msg)
        return ("ok", "pending")
