"""QueueStateMachine: applies committed Raft entries to the LMDB queue state.

Contract (hashicorp/raft fsm.go: "Apply must be deterministic"):
* `apply(index, entry, txn)` reads nothing but the entry and the store: no
  clock, socket or randomness. Ids and timestamps were made before submit.
* Idempotent by index: an entry at or below the stored applied index is
  skipped, so replaying the journal after a restart changes nothing.
* Invalid input (undecodable entry, missing chunks) is rejected the same way
  on every node and recorded as a result; it never raises past here. The one
  exception: an entry a newer mqnode wrote (`NewerFormatError`) raises, and
  the node stops applying (raft/node.py) rather than skip what its upgraded
  peers apply.

Dispatch fencing (see docs/design/dispatch.md): the state holds the current
lease (holder, epoch = the holder's Raft term). A LeaseRenew, Claim or
RecordOutcome from an epoch older than the current lease is rejected; a Claim
is granted for a message that is unclaimed, claimed by the same epoch, or
claimed by an epoch that has ended (older than the current lease).

Results (one per command in the entry):
    ("queued", queue_id) | ("duplicate", queue_id) | ("rejected", reason) | ("ok", "")
    Claim: ("ok", "id1,id2") — the ids granted
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from mqnode.compression import could_hold
from mqnode.errors import CodecError, ConfigError, NewerFormatError
from mqnode.spool.commands import (
    BODY_ENCODINGS,
    DEFLATE,
    QUEUE_OPS,
    SUPPRESS_OPS,
    Announce,
    Audit,
    Claim,
    Command,
    Enqueue,
    LeaseRenew,
    PutChunk,
    QueueOp,
    RecordOutcome,
    SetShaping,
    Suppress,
    decode_entry,
)
from mqnode.spool.dsnparams import MAX_ENVID_CHARS, MAX_ORCPT_CHARS, DsnRequest
from mqnode.spool.model import Outcome, QueuedMessage, RcptState, Recipient, find_message_id
from mqnode.spool.shaping_rules import ShapingRules
from mqnode.spool.store import OPERATOR_RETRIES, SHAPING, StateTxn
from mqnode.spool.suppression import ENTRIES_PER_COMMAND, Entry, invalid_item

MAX_ANNOUNCED_MEMBERS = 64  # far beyond any Raft cluster's size; bounds the meta record
log = logging.getLogger(__name__)

Result = tuple[str, str]

MISSES_CHUNKS = " misses chunks "  # in an Enqueue's rejection when body chunks are missing


def misses_chunks(result: Result) -> bool:
    """An Enqueue refused only because some of its body chunks have not been applied."""
    return result[0] == "rejected" and MISSES_CHUNKS in result[1]


IDEM_WINDOW_MS = 24 * 3600 * 1000
UPLOAD_TTL_MS = 3600 * 1000
GC_BATCH = 16
MAX_AUDIT_TARGET_CHARS = 4096


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
        if cmd.body_encoding not in BODY_ENCODINGS or (cmd.body_encoding and cmd.body is None):
            return f"Enqueue: body encoding {cmd.body_encoding[:20]!r} unknown or without a body"
        if cmd.body_encoding and not could_hold(len(cmd.body or b""), cmd.body_size):
            return "Enqueue: a deflated body cannot hold its stated size"
        return _invalid_dsn(cmd)
    elif isinstance(cmd, PutChunk):
        if _bad_id(cmd.upload_id) or not 0 <= cmd.seq < MAX_CHUNKS or cmd.created_ms < 0:
            return "PutChunk: bad upload id or sequence"
    elif isinstance(cmd, RecordOutcome):
        if _bad_id(cmd.queue_id):
            return "RecordOutcome: bad queue id"
        if cmd.dsn_body and _bad_id(cmd.dsn_queue_id):
            return "RecordOutcome: bad bounce queue id"
    elif isinstance(cmd, Claim):
        if any(_bad_id(q) for q in cmd.queue_ids):
            return "Claim: bad queue id"
    elif isinstance(cmd, QueueOp):
        if cmd.op not in QUEUE_OPS:
            return f"QueueOp: unknown operation {cmd.op!r}"
        if any(_bad_id(q) for q in cmd.queue_ids):
            return "QueueOp: bad queue id"
    elif isinstance(cmd, Suppress):
        if cmd.op not in SUPPRESS_OPS or len(cmd.entries) > ENTRIES_PER_COMMAND:
            return "Suppress: unknown operation or too many entries"
        for item in cmd.entries:
            if problem := invalid_item(item):
                return f"Suppress: {problem}"
    elif isinstance(cmd, Audit):
        if cmd.at_ms < 0 or cmd.keep_ms <= 0:
            return "Audit: negative time or no retention"
        if len(cmd.principal) > 200 or len(cmd.action) > 200 or len(cmd.node_id) > 200:
            return "Audit: name too long"
        if len(cmd.target) > MAX_AUDIT_TARGET_CHARS:
            return "Audit: target too long"
    elif isinstance(cmd, Announce):
        if not 0 < len(cmd.raft_addr) <= 255:
            return "Announce: bad address"
        if len(cmd.members) > MAX_ANNOUNCED_MEMBERS or any(
            not 0 < len(m) <= 255 for m in cmd.members
        ):
            return "Announce: bad member list"
    return None


def _invalid_dsn(cmd: Enqueue) -> str | None:
    n = len(cmd.recipients)
    if cmd.dsn_ret not in ("", "FULL", "HDRS") or len(cmd.dsn_envid) > MAX_ENVID_CHARS:
        return "Enqueue: bad DSN RET or ENVID"
    if len(cmd.dsn_notify) not in (0, n) or len(cmd.dsn_orcpt) not in (0, n):
        return "Enqueue: DSN parameters do not match the recipients"
    if any(len(v) > MAX_ORCPT_CHARS for v in (*cmd.dsn_notify, *cmd.dsn_orcpt)):
        return "Enqueue: DSN parameter too long"
    return None


def _dsn_extra(cmd: Enqueue) -> dict[str, Any]:
    if not (cmd.dsn_ret or cmd.dsn_envid or cmd.dsn_notify or cmd.dsn_orcpt):
        return {}  # the common case, without building a request per message
    dsn = DsnRequest(cmd.dsn_ret, cmd.dsn_envid, cmd.dsn_notify, cmd.dsn_orcpt)
    return {"dsn": dsn.to_record()} if dsn else {}


def _audit_record(cmd: Audit) -> dict[str, Any]:
    return {
        "at_ms": cmd.at_ms,
        "principal": cmd.principal,
        "action": cmd.action,
        "target": cmd.target,
        "node_id": cmd.node_id,
    }


class QueueStateMachine:
    def apply(self, index: int, entry: bytes, txn: StateTxn) -> list[Result] | None:
        """Apply one log entry; None if it was applied before (replay)."""
        applied = txn.applied_index()
        if index <= applied:
            return None
        try:
            commands = decode_entry(entry)
        except NewerFormatError:
            raise
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
                "reads": cmd.reads,
                **({"members": sorted(cmd.members)} if cmd.members else {}),
            }
            txn.put_meta("nodes", nodes)
            return ("ok", "")
        if isinstance(cmd, RecordOutcome):
            return self._record_outcome(cmd, txn)
        if isinstance(cmd, LeaseRenew):
            return self._renew(cmd, txn)
        if isinstance(cmd, Claim):
            return self._claim(cmd, txn)
        if isinstance(cmd, QueueOp):
            return self._queue_op(cmd, txn)
        if isinstance(cmd, Suppress):
            return self._suppress(cmd, txn)
        if isinstance(cmd, Audit):
            txn.put_audit(cmd.at_ms, _audit_record(cmd))
            txn.expire_audit(cmd.at_ms - cmd.keep_ms, GC_BATCH)
            return ("ok", "")
        if isinstance(cmd, SetShaping):
            try:
                ShapingRules.parse(cmd.text)
            except ConfigError as exc:
                return ("rejected", str(exc))
            txn.put_meta(SHAPING, {"text": cmd.text, "at_ms": cmd.at_ms})
            return ("ok", "")
        raise AssertionError(f"unhandled command {cmd!r}")

    def _suppress(self, cmd: Suppress, txn: StateTxn) -> Result:
        """Add or remove entries; the result counts those that changed the list."""
        changed = 0
        for item in cmd.entries:
            if cmd.op == "add":
                txn.put_suppression(Entry(*item))
                changed += 1
            elif txn.delete_suppression(item[1], item[0], count=True):
                changed += 1
        txn.expire_suppressions(cmd.at_ms, GC_BATCH)
        return ("ok", str(changed))

    def _queue_op(self, cmd: QueueOp, txn: StateTxn) -> Result:
        done = []
        for qid in cmd.queue_ids:
            msg = txn.get_message(qid)
            if msg is None:
                continue
            if cmd.op == "delete":
                txn.delete_message(msg)
            elif cmd.op == "hold":
                if msg.hold:
                    continue
                txn.put_message(msg.with_changes(hold=True), msg)
            elif cmd.op == "release":
                if not msg.hold:
                    continue
                txn.put_message(msg.with_changes(hold=False, next_attempt_ms=cmd.at_ms), msg)
            else:  # retry: due now (a held message stays held)
                txn.put_message(msg.with_changes(next_attempt_ms=cmd.at_ms), msg)
            done.append(qid)
        if cmd.op == "retry" and done:
            # The dispatcher lifts its suspensions of unreachable destinations when this
            # changes (an operator's flush says the destination may be back).
            txn.put_meta(OPERATOR_RETRIES, int(txn.get_meta(OPERATOR_RETRIES, 0)) + 1)
        return ("ok", ",".join(done))

    @staticmethod
    def lease_epoch(txn: StateTxn) -> int:
        return int(txn.get_meta("lease", {}).get("epoch", 0))

    def _renew(self, cmd: LeaseRenew, txn: StateTxn) -> Result:
        if cmd.epoch < self.lease_epoch(txn):
            return ("rejected", "stale lease epoch")
        txn.put_meta(
            "lease",
            {
                "node_id": cmd.node_id,
                "raft_addr": cmd.raft_addr,
                "epoch": cmd.epoch,
                "duration_ms": cmd.duration_ms,
            },
        )
        return ("ok", "")

    def _claim(self, cmd: Claim, txn: StateTxn) -> Result:
        if cmd.epoch != self.lease_epoch(txn):
            return ("rejected", "claim outside the current lease epoch")
        granted = []
        for qid in cmd.queue_ids:
            msg = txn.get_message(qid)
            if msg is None or msg.hold or msg.complete:
                continue
            if msg.claim_epoch not in (0, cmd.epoch) and msg.claim_epoch >= cmd.epoch:
                continue  # claimed by a newer epoch: impossible unless a stale claim
            txn.put_message(msg.with_changes(claim_epoch=cmd.epoch, claim_node=cmd.node_id), msg)
            granted.append(qid)
        return ("ok", ",".join(granted))

    def _enqueue(self, cmd: Enqueue, txn: StateTxn) -> Result:
        txn.expire_idem(cmd.received_ms - IDEM_WINDOW_MS, GC_BATCH)
        txn.expire_uploads(cmd.received_ms - UPLOAD_TTL_MS, GC_BATCH)
        txn.expire_suppressions(cmd.received_ms, GC_BATCH)
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
            if cmd.body_encoding == DEFLATE:
                txn.put_deflated_body(body_key, cmd.body, cmd.body_size)
            else:
                txn.put_body_chunk(body_key, 0, cmd.body)
        else:
            body_key, chunks = cmd.upload_id, cmd.chunks
            missing = [s for s in range(chunks) if not txn.has_body_chunk(body_key, s)]
            if missing:
                return ("rejected", f"upload {body_key}{MISSES_CHUNKS}{missing[:5]}")
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
            extra=_dsn_extra(cmd),
        )
        txn.put_message(msg, None)
        txn.put_idem(cmd.idem_key, cmd.queue_id, cmd.received_ms)
        return ("queued", cmd.queue_id)

    def _record_outcome(self, cmd: RecordOutcome, txn: StateTxn) -> Result:
        if cmd.epoch < self.lease_epoch(txn):
            return ("rejected", "outcome from a stale lease epoch")
        msg = txn.get_message(cmd.queue_id)
        if msg is None:
            return ("rejected", "no such message")
        if cmd.dsn_body:
            self._queue_dsn(cmd, msg, txn)
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
            claim_epoch=0,
            claim_node="",
        )
        if updated.complete:
            txn.delete_message(msg)
            return ("ok", "complete")
        txn.put_message(updated, msg)
        return ("ok", "pending")

    def _queue_dsn(self, cmd: RecordOutcome, original: QueuedMessage, txn: StateTxn) -> None:
        """The bounce for `original`, from the null sender (never bounced itself)."""
        if not original.mail_from or txn.get_message(cmd.dsn_queue_id) is not None:
            return
        idem = hashlib.sha256(b"dsn\0" + cmd.dsn_queue_id.encode()).digest()
        if txn.get_idem(idem) is not None:
            return
        txn.put_body_chunk(cmd.dsn_queue_id, 0, cmd.dsn_body)
        dsn = QueuedMessage(
            queue_id=cmd.dsn_queue_id,
            received_ms=cmd.at_ms,
            mail_from="",
            recipients=(Recipient(original.mail_from),),
            size=len(cmd.dsn_body),
            message_id=find_message_id(cmd.dsn_body) or "",
            body_key=cmd.dsn_queue_id,
            body_chunks=1,
            body_sha256=hashlib.sha256(cmd.dsn_body).digest(),
            client="",
            accepted_by=original.accepted_by,
            next_attempt_ms=cmd.at_ms,
        )
        txn.put_message(dsn, None)
        txn.put_idem(idem, cmd.dsn_queue_id, cmd.at_ms)
