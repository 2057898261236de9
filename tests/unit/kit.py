"""Shared helpers for the unit tests: command factories, a transcript driver, store dumps.

Plain functions and small classes (no fixtures) so Hypothesis tests can use
them inside a `fresh_store()` context without function-scoped fixtures.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from mqnode.clock import ManualClock
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.commands import (
    Command,
    Enqueue,
    EntrySizes,
    PutChunk,
    RecordOutcome,
    encode_entry,
)
from mqnode.spool.model import QueuedMessage, Recipient
from mqnode.spool.statemachine import QueueStateMachine, Result
from mqnode.spool.store import QueueStore

T0 = 1_700_000_000_000
DB_NAMES = (
    "meta",
    "msgs",
    "body",
    "due",
    "due_by_domain",
    "idem",
    "idem_by_time",
    "uploads",
    "uploads_by_time",
)

Dump = dict[str, list[tuple[bytes, bytes]]]


def open_store(path: Path) -> QueueStore:
    return QueueStore(path, map_size_mb=64)


@contextmanager
def fresh_store() -> Iterator[QueueStore]:
    """A QueueStore in its own temporary directory (for use inside Hypothesis tests)."""
    with tempfile.TemporaryDirectory(prefix="mqnode-unit-") as d:
        store = open_store(Path(d) / "state")
        try:
            yield store
        finally:
            store.close()


def dump(store: QueueStore) -> Dump:
    """Every key/value of every named DB, in key order: the whole replicated state."""
    out: Dump = {}
    with store.reader() as r:
        txn = r._txn
        for name in DB_NAMES:
            handle = getattr(store, f"_{name}")
            out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=handle)]
    return out


def enqueue(
    queue_id: str = "Q1",
    at_ms: int = T0,
    rcpts: tuple[str, ...] = ("rcpt@example.com",),
    body: bytes | None = b"Subject: hi\r\n\r\nhello\r\n",
    *,
    idem: bytes | None = None,
    upload_id: str = "",
    chunks: int = 0,
    full_body: bytes | None = None,
    mail_from: str = "sender@example.com",
) -> Enqueue:
    """An Enqueue as ingress would build it; `idem` defaults to one derived from the id."""
    whole = full_body if full_body is not None else (body or b"")
    return Enqueue(
        queue_id=queue_id,
        received_ms=at_ms,
        mail_from=mail_from,
        recipients=rcpts,
        body=body,
        upload_id=upload_id,
        chunks=chunks,
        body_size=len(whole),
        body_sha256=hashlib.sha256(whole).digest(),
        idem_key=idem if idem is not None else hashlib.sha256(queue_id.encode()).digest(),
        message_id=f"<{queue_id}@test>",
        client="127.0.0.1",
        node_id="n1",
    )


def queued_message(
    queue_id: str = "Q1", rcpts: tuple[str | Recipient, ...] = ("rcpt@example.com",), **fields: Any
) -> QueuedMessage:
    """A message as the state holds it, built directly; `fields` override the defaults."""
    values: dict[str, Any] = {
        "queue_id": queue_id,
        "received_ms": T0,
        "mail_from": "sender@example.com",
        "recipients": tuple(Recipient(r) if isinstance(r, str) else r for r in rcpts),
        "size": 1,
        "message_id": f"<{queue_id}@test>",
        "body_key": queue_id,
        "body_chunks": 1,
        "body_sha256": b"",
        "client": "127.0.0.1",
        "accepted_by": "n1",
    }
    return QueuedMessage(**{**values, **fields})


def chunked(
    queue_id: str, body: bytes, chunk_bytes: int, at_ms: int = T0
) -> tuple[list[PutChunk], Enqueue]:
    """PutChunk commands and the Enqueue naming them, upload id == queue id (as ingress)."""
    parts = [body[i : i + chunk_bytes] for i in range(0, len(body), chunk_bytes)]
    puts = [PutChunk(queue_id, seq, part, at_ms) for seq, part in enumerate(parts)]
    enq = enqueue(queue_id, at_ms, body=None, upload_id=queue_id, chunks=len(parts), full_body=body)
    return puts, enq


def outcome(
    queue_id: str,
    results: list[tuple[int, str, str]],
    at_ms: int = T0,
    next_ms: int = 0,
    epoch: int = 0,
    dsn: tuple[str, bytes] = ("", b""),
) -> RecordOutcome:
    return RecordOutcome(
        queue_id, at_ms, tuple(results), next_ms or at_ms + 300_000, epoch, dsn[0], dsn[1]
    )


class Transcript:
    """Feeds entries to a QueueStateMachine as the Raft tick thread does: apply, then commit."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.machine = QueueStateMachine()
        self.index = 0

    def apply(self, *cmds: Command) -> list[Result] | None:
        """Apply one entry holding `cmds` at the next index."""
        self.index += 1
        return self.apply_raw(self.index, encode_entry(list(cmds)))

    def apply_raw(self, index: int, entry: bytes) -> list[Result] | None:
        self.index = max(self.index, index)
        try:
            results = self.machine.apply(index, entry, self.store.apply_txn())
        except BaseException:
            self.store.abort_apply()  # what RaftNode._roll_back does
            raise
        self.store.commit_apply()
        return results

    def one(self, cmd: Command) -> Result:
        """Apply a single command at the next index and return its result."""
        results = self.apply(cmd)
        assert results is not None and len(results) == 1, results
        return results[0]


class Applies:
    """A submitter that applies each command through the real state machine, one entry
    each, as the leader would, and keeps the commands it was given."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.machine = QueueStateMachine()
        self.index = 0
        self.cmds: list[Command] = []

    def apply(self, cmd: Command) -> Result:
        self.index += 1
        results = self.machine.apply(self.index, encode_entry([cmd]), self.store.apply_txn())
        self.store.commit_apply()
        assert results is not None
        return results[0]

    async def submit(self, cmd: Command) -> Result:
        self.cmds.append(cmd)
        return self.apply(cmd)

    def is_leader(self) -> bool:
        return True


class Recorder:
    """A submitter that keeps each command and answers that it was queued."""

    def __init__(self) -> None:
        self.got: list[Command] = []

    async def submit(self, cmd: Command) -> Result:
        self.got.append(cmd)
        return ("queued", "Q")


def smtp_data(
    ing: SmtpIngress, body: bytes, rcpt: str = "b@example.org", mail_from: str = "a@example.org"
) -> str:
    """One message handed to SMTP ingress as after DATA; its reply."""

    async def run() -> str:
        session = Session(asyncio.get_running_loop())
        session.peer = ("127.0.0.1", 40000)
        env = Envelope()
        env.mail_from = mail_from
        env.rcpt_tos = [rcpt]
        env.content = env.original_content = body
        reply: str = await ing.handle_DATA(None, session, env)  # type: ignore[arg-type]
        return reply

    return asyncio.run(run())


def commands_of_one_message(store: QueueStore, sizes: EntrySizes, body: bytes) -> list[Command]:
    """One message through SMTP ingress whose intake goes by `sizes`: the commands it
    submitted (each applied to `store`)."""
    rep = Applies(store)
    ing = SmtpIngress(
        rep, ManualClock(), os.urandom, "n1", "test.local", ["127.0.0.0/8"], 10, lambda: 0.0
    )
    ing.intake.sizes = lambda: sizes
    assert smtp_data(ing, body).startswith("250")
    return rep.cmds
