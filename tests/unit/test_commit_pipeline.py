"""CommitPipeline's contract against a scripted Raft node: batching, timeout, retry.

The Raft side is a stand-in that records the entries it is given and answers
them when the test says so (the real node is covered by the integration and
fault suites); the entries it receives are decoded with the real codec.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest

from mqnode.clock import SystemClock
from mqnode.errors import CommitTimeoutError, NoLeaderError, SubmitError
from mqnode.raft import RaftNode
from mqnode.raft.commit_pipeline import MAX_COMMAND_BYTES, CommitPipeline
from mqnode.spool.commands import (
    BIG_ENTRIES,
    READS_LEVEL,
    SMALL_ENTRIES,
    Announce,
    Claim,
    Command,
    PutChunk,
    RecordOutcome,
    decode_entry,
)

from .kit import enqueue

Done = Callable[[Any, str | None], None]


class ScriptedRaft:
    def __init__(self) -> None:
        self.entries: list[tuple[list[Command], Done]] = []
        self.early: list[bool] = []

    def submit_entry(self, entry: bytes, done: Done, early: bool = False) -> None:
        self.entries.append((decode_entry(entry), done))
        self.early.append(early)


def claim(i: int) -> Claim:
    return Claim((f"q{i}",), "n1", 1)


async def _pipeline(raft: ScriptedRaft, timeout_s: float = 5.0, inflight: int = 16) -> Any:
    p = CommitPipeline(cast(RaftNode, raft), SystemClock(), 100, timeout_s, inflight)
    p.start()
    return p


async def _until(pred: Callable[[], bool]) -> None:
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in 1 s")


def test_waiting_submissions_share_an_entry_and_get_their_own_results() -> None:
    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, inflight=1)
        first = asyncio.ensure_future(p.submit(claim(0)))
        await _until(lambda: len(raft.entries) == 1)
        rest = [asyncio.ensure_future(p.submit(claim(i))) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        assert len(raft.entries) == 1  # one entry in flight: the others wait and batch
        raft.entries[0][1](["r0"], None)
        await _until(lambda: len(raft.entries) == 2)
        cmds, done = raft.entries[1]
        assert cmds == [claim(i) for i in range(1, 6)]
        done([f"r{i}" for i in range(1, 6)], None)
        assert await first == "r0"
        assert await asyncio.gather(*rest) == [f"r{i}" for i in range(1, 6)]
        assert p.pending == 0
        await p.stop()

    asyncio.run(run())


def test_a_submission_never_answered_times_out_and_frees_its_place() -> None:
    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, timeout_s=0.1)
        with pytest.raises(CommitTimeoutError):
            await p.submit(claim(0))
        assert p.pending == 0
        raft.entries[0][1](["late"], None)  # a late answer is ignored, not an error
        await p.stop()

    asyncio.run(run())


def test_idempotent_commands_are_retried_after_a_leader_change_others_are_not() -> None:
    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft)
        retried = asyncio.ensure_future(p.submit(claim(0)))
        await _until(lambda: len(raft.entries) == 1)
        raft.entries[0][1](None, "leader_changed")
        await _until(lambda: len(raft.entries) == 2)  # the same command, again
        assert raft.entries[1][0] == [claim(0)]
        raft.entries[1][1](["ok"], None)
        assert await retried == "ok"

        outcome = RecordOutcome("q1", 1, ((0, "delivered", "250 ok"),), 0, 1, "", b"")
        once = asyncio.ensure_future(p.submit(outcome))
        await _until(lambda: len(raft.entries) == 3)
        raft.entries[2][1](None, "leader_changed")  # may have been appended: not retried
        with pytest.raises(NoLeaderError):
            await once
        await asyncio.sleep(0.1)
        assert len(raft.entries) == 3
        await p.stop()

    asyncio.run(run())


def test_an_entry_of_smtp_submissions_only_is_answered_before_the_state_commit() -> None:
    """Enqueue (and PutChunk) callers never read the state back; a claim's caller does."""

    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, inflight=1)
        first = asyncio.ensure_future(p.submit(enqueue("Q0")))
        await _until(lambda: len(raft.entries) == 1)
        mixed = [asyncio.ensure_future(p.submit(c)) for c in (enqueue("Q1"), claim(1))]
        await asyncio.sleep(0.01)
        raft.entries[0][1]([("queued", "Q0")], None)
        await _until(lambda: len(raft.entries) == 2)
        raft.entries[1][1]([("queued", "Q1"), ("ok", "")], None)
        await asyncio.gather(first, *mixed)
        assert raft.early == [True, False]  # one claim makes its whole entry wait
        await p.stop()

    asyncio.run(run())


def test_an_announce_goes_in_an_entry_of_its_own() -> None:
    """A member that cannot decode it skips that entry alone, never mail batched with it."""

    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, inflight=1)
        first = asyncio.ensure_future(p.submit(claim(0)))
        await _until(lambda: len(raft.entries) == 1)
        announce = Announce("a:1", "n1", "s:2", "d:3", 4, READS_LEVEL)
        waiting = [
            asyncio.ensure_future(p.submit(c)) for c in (claim(1), announce, claim(2), claim(3))
        ]
        await asyncio.sleep(0.01)
        for n in range(1, 4):  # answer each entry as it comes, one in flight at a time
            raft.entries[n - 1][1]([f"r{n}"] * len(raft.entries[n - 1][0]), None)
            await _until(lambda n=n: len(raft.entries) == n + 1)  # type: ignore[misc]
        assert [cmds for cmds, _ in raft.entries[1:]] == [
            [claim(1)],
            [announce],
            [claim(2), claim(3)],
        ]
        raft.entries[3][1](["x", "y"], None)
        await asyncio.gather(first, *waiting)
        await p.stop()

    asyncio.run(run())


def test_entries_raft_never_answers_free_their_slots_at_their_deadline() -> None:
    """pysyncobj may never answer a command it took (a forwarded command lost with its
    connection, one overtaken by a snapshot install). The slots are ours to free: more
    unanswered entries than there are slots must not stop the pipeline for good."""

    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, timeout_s=0.1, inflight=2)
        lost = [asyncio.ensure_future(p.submit(claim(i))) for i in range(6)]
        for f in lost:
            with pytest.raises(CommitTimeoutError):
                await f
        assert p.health().timing_out
        await _until(lambda: p.inflight == 0)
        sent = len(raft.entries)
        later = asyncio.ensure_future(p.submit(claim(99)))
        await _until(lambda: len(raft.entries) == sent + 1)
        raft.entries[-1][1](["ok"], None)
        assert await later == "ok"
        health = p.health()
        assert not health.timing_out
        assert health.expired_entries == sent
        for _, done in raft.entries[:sent]:
            done(["late"], None)  # answers after the deadline change nothing
        assert p.inflight == 0 and p.pending == 0
        await p.stop()

    asyncio.run(run())


def test_a_straggler_timing_out_after_a_later_commit_is_not_a_wedge() -> None:
    """/readyz reads health(): a submission begun before the last commit and timing out
    after it is left over from a fault that has healed; one begun later is not."""

    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft, timeout_s=0.2, inflight=2)
        straggler = asyncio.ensure_future(p.submit(claim(0)))
        await _until(lambda: len(raft.entries) == 1)
        later = asyncio.ensure_future(p.submit(claim(1)))
        await _until(lambda: len(raft.entries) == 2)
        raft.entries[1][1](["ok"], None)
        assert await later == "ok"
        with pytest.raises(CommitTimeoutError):
            await straggler
        assert not p.health().timing_out
        with pytest.raises(CommitTimeoutError):
            await p.submit(claim(2))  # begun after the commit: the path is wedged now
        assert p.health().timing_out
        await p.stop()

    asyncio.run(run())


def test_entries_are_packed_to_the_size_the_cluster_carries() -> None:
    async def run() -> None:
        raft = ScriptedRaft()
        limit = [SMALL_ENTRIES.max_entry]
        p = CommitPipeline(
            cast(RaftNode, raft), SystemClock(), 100, 5.0, 1, entry_bytes=lambda: limit[0]
        )
        p.start()
        first = asyncio.ensure_future(p.submit(claim(0)))
        await _until(lambda: len(raft.entries) == 1)
        chunks = [PutChunk("U1", i, b"d" * 20_000, 1) for i in range(10)]
        waiting = [asyncio.ensure_future(p.submit(c)) for c in chunks]
        await asyncio.sleep(0.01)
        raft.entries[0][1](["r0"], None)
        await _until(lambda: len(raft.entries) == 2)
        assert len(raft.entries[1][0]) == 2, "two 20 KB chunks under 56 KiB"
        limit[0] = BIG_ENTRIES.max_entry  # every member reads level 6 now
        raft.entries[1][1](["ok"] * 2, None)
        await _until(lambda: len(raft.entries) == 3)
        assert len(raft.entries[2][0]) == 8, "the rest in one entry"
        raft.entries[2][1](["ok"] * 8, None)
        await first
        await asyncio.gather(*waiting)
        await p.stop()

    asyncio.run(run())


def test_a_command_too_big_for_any_entry_is_refused_at_once() -> None:
    async def run() -> None:
        raft = ScriptedRaft()
        p = await _pipeline(raft)
        huge = PutChunk("U1", 0, b"h" * MAX_COMMAND_BYTES, 1)
        with pytest.raises(SubmitError, match="too big for a log entry"):
            await p.submit(huge)
        assert not raft.entries
        await p.stop()

    asyncio.run(run())
