"""A chunked body whose chunk lands after its Enqueue is sent again, not refused."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import Envelope, Session

from mqnode.clock import ManualClock
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.commands import CHUNK_BYTES, Command, PutChunk, encode_entry
from mqnode.spool.statemachine import QueueStateMachine, Result
from mqnode.spool.store import QueueStore


class _LosesFirstChunkOnce:
    """Applies each command through the real state machine, as one Raft entry each,
    except that the first PutChunk it sees is held back until after the next
    command: what a chunk retried across a leader change looks like."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.machine = QueueStateMachine()
        self.index = 0
        self.dropped_once = False
        self.submitted: list[str] = []

    def _apply(self, cmd: Command) -> Result:
        self.index += 1
        results = self.machine.apply(self.index, encode_entry([cmd]), self.store.apply_txn())
        self.store.commit_apply()
        assert results is not None
        return results[0]

    async def submit(self, cmd: Command) -> Result:
        self.submitted.append(type(cmd).__name__)
        if isinstance(cmd, PutChunk) and not self.dropped_once:
            self.dropped_once = True
            await asyncio.sleep(0.01)  # applied late, after the Enqueue
            return self._apply(cmd)
        return self._apply(cmd)

    def is_leader(self) -> bool:
        return True


def test_enqueue_missing_a_chunk_is_retried_after_its_chunks(store: QueueStore) -> None:
    rep = _LosesFirstChunkOnce(store)
    ing = SmtpIngress(
        rep,
        ManualClock(),
        lambda n: b"\1" * n,
        "n1",
        "test.local",
        ["127.0.0.0/8"],
        10,
        lambda: 0.0,
    )
    body = b"Subject: big\r\nMessage-ID: <big@test>\r\n\r\n" + b"x" * (2 * CHUNK_BYTES)

    async def run() -> str:
        session = Session(asyncio.get_running_loop())
        session.peer = ("127.0.0.1", 40000)
        env = Envelope()
        env.mail_from = "a@example.org"
        env.rcpt_tos = ["b@example.org"]
        env.content = body
        env.original_content = body
        reply: str = await ing.handle_DATA(None, session, env)  # type: ignore[arg-type]
        return reply

    reply = asyncio.run(run())
    assert reply.startswith("250"), reply
    # First round: chunks and Enqueue together (the Enqueue refused); then the chunks
    # again, and the Enqueue only after them.
    assert rep.submitted.count("Enqueue") == 2 and rep.submitted[-1] == "Enqueue"
    queued = store.list_messages(10)
    assert len(queued) == 1
    assert store.read_body(queued[0]).endswith(body)
