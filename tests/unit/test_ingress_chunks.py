"""Chunked bodies: a chunk that lands after its Enqueue is sent again, not refused; a big
body's chunks go a window at a time."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiosmtpd.smtp import Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from mqnode.clock import ManualClock
from mqnode.errors import BackpressureError
from mqnode.intake import CHUNKS_IN_FLIGHT, _chunks
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.commands import (
    BIG_ENTRIES,
    SMALL_ENTRIES,
    Command,
    Enqueue,
    EntrySizes,
    PutChunk,
    encode_entry,
)
from mqnode.spool.statemachine import Result
from mqnode.spool.store import QueueStore

from .kit import Applies, commands_of_one_message, smtp_data

CHUNK_BYTES = SMALL_ENTRIES.chunk  # intake's sizes until the door is told the cluster's


class _LosesFirstChunkOnce(Applies):
    """Applies each command through the real state machine, as one Raft entry each,
    except that the first PutChunk it sees is held back until after the next
    command: what a chunk retried across a leader change looks like."""

    def __init__(self, store: QueueStore) -> None:
        super().__init__(store)
        self.dropped_once = False
        self.submitted: list[str] = []

    async def submit(self, cmd: Command) -> Result:
        self.submitted.append(type(cmd).__name__)
        if isinstance(cmd, PutChunk) and not self.dropped_once:
            self.dropped_once = True
            await asyncio.sleep(0.01)  # applied late, after the Enqueue
            return self.apply(cmd)
        return self.apply(cmd)


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
    reply = smtp_data(ing, body)
    assert reply.startswith("250"), reply
    # First round: chunks and Enqueue together (the Enqueue refused); then the chunks
    # again, and the Enqueue only after them.
    assert rep.submitted.count("Enqueue") == 2 and rep.submitted[-1] == "Enqueue"
    queued = store.list_messages(10)
    assert len(queued) == 1
    assert store.read_body(queued[0]).endswith(body)


class _Bounded(_LosesFirstChunkOnce):
    """The pipeline's `max_pending_commits`: refuses a submission past `limit` waiting."""

    def __init__(self, store: QueueStore, limit: int) -> None:
        super().__init__(store)
        self.dropped_once = True  # nothing held back
        self.limit = limit
        self.pending = 0
        self.most = 0

    async def submit(self, cmd: Command) -> Result:
        if self.pending >= self.limit:
            raise BackpressureError(f"too many commits pending ({self.pending})")
        self.pending += 1
        self.most = max(self.most, self.pending)
        try:
            await asyncio.sleep(0.001)  # a commit round
            return self.apply(cmd)
        finally:
            self.pending -= 1


def test_a_big_body_goes_a_window_of_chunks_at_a_time(store: QueueStore) -> None:
    """Twenty 5 MiB messages at once were 2,160 commands and were refused 451 past
    max_pending_commits; a body's chunks now wait for room, a window at a time."""
    rep = _Bounded(store, limit=4 * (CHUNKS_IN_FLIGHT + 1))
    ing = SmtpIngress(
        rep,
        ManualClock(),
        os.urandom,
        "n1",
        "test.local",
        ["127.0.0.0/8"],
        10,
        lambda: 0.0,
    )
    body = b"Subject: big\r\n\r\n" + b"y" * (30 * CHUNK_BYTES)

    async def one(k: int) -> str:
        session = Session(asyncio.get_running_loop())
        session.peer = ("127.0.0.1", 40000 + k)
        env = Envelope()
        env.mail_from = "a@example.org"
        env.rcpt_tos = [f"b{k}@example.org"]
        env.content = env.original_content = body
        reply: str = await ing.handle_DATA(None, session, env)  # type: ignore[arg-type]
        return reply

    async def run() -> list[str]:
        return list(await asyncio.gather(*(one(k) for k in range(4))))

    assert all(r.startswith("250") for r in asyncio.run(run()))
    assert rep.most <= 4 * (CHUNKS_IN_FLIGHT + 1)
    assert len(store.list_messages(10)) == 4


def _recorded_submission(store: QueueStore, sizes: EntrySizes, body: bytes) -> list[Command]:
    """One message through SMTP ingress whose intake splits by `sizes`: the commands."""
    cmds = commands_of_one_message(store, sizes, body)
    (queued,) = store.list_messages(10)
    assert store.read_body(queued).endswith(body)
    return cmds


@pytest.mark.parametrize(
    ("sizes", "inline"),
    [(SMALL_ENTRIES, False), (BIG_ENTRIES, True)],
    ids=["an older member: 48 KiB chunks", "every member reads level 6: inline"],
)
def test_a_body_is_split_by_the_entry_sizes_the_cluster_carries(
    store: QueueStore, sizes: EntrySizes, inline: bool
) -> None:
    body = b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 5000  # ~500 KB
    cmds = _recorded_submission(store, sizes, body)
    chunks = [c for c in cmds if isinstance(c, PutChunk)]
    (enqueue,) = [c for c in cmds if isinstance(c, Enqueue)]
    if inline:
        assert not chunks and enqueue.body is not None and enqueue.body.endswith(body)
    else:
        assert enqueue.body is None and len(chunks) == enqueue.chunks > 10
        assert max(len(c.data) for c in chunks) == SMALL_ENTRIES.chunk
    assert all(len(encode_entry([c])) < sizes.max_entry for c in cmds)


def test_a_body_over_the_big_inline_size_goes_in_chunks_of_the_big_size(
    store: QueueStore,
) -> None:
    body = b"Subject: big\r\n\r\n" + (b"w" * 998 + b"\r\n") * 2600  # ~2.5 MiB
    cmds = _recorded_submission(store, BIG_ENTRIES, body)
    chunks = [c for c in cmds if isinstance(c, PutChunk)]
    assert [len(c.data) for c in chunks[:2]] == [BIG_ENTRIES.chunk] * 2 and len(chunks) == 3
    assert all(len(encode_entry([c])) < BIG_ENTRIES.max_entry for c in cmds)


@given(
    head=st.binary(max_size=300),
    body_len=st.integers(0, 5 * 1000 + 7),
    step=st.sampled_from([1, 7, 299, 300, 301, 1000]),
)
def test_chunks_are_head_and_body_cut_at_every_step(head: bytes, body_len: int, step: int) -> None:
    # Intake cuts `head + body` without joining them first; the cuts are the same.
    body = bytes(i % 251 for i in range(body_len))
    whole = head + body
    assert _chunks(head, body, step) == [whole[i : i + step] for i in range(0, len(whole), step)]
