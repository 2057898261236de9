"""When nodes fsync their journals: the leader once per round it sends, a follower first.

Three RaftNodes in one process on loopback. An entry the pacer holds back
cannot be committed before it goes out, so the leader flushes its journal
in the tick that sends it (any send: paced, heartbeat or resend), not in
every tick that appended something. What must still hold: an answered
entry is on the leader's disk and on a follower's. A follower flushes what
its poll appended, and releases its acks, before the tick applies anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mqnode.raft import RaftNode
from mqnode.spool.commands import encode_entry
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

from .kit import enqueue
from .raftkit import free_addrs, raft_settings

pytestmark = pytest.mark.timeout(90)

BATCH_MS = 50  # a long pacing interval: many submissions per round


@asynccontextmanager
async def three_nodes(tmp_path: Path) -> AsyncIterator[list[RaftNode]]:
    addrs = free_addrs(3)
    loop = asyncio.get_running_loop()
    nodes = []
    for i, addr in enumerate(addrs):
        data = tmp_path / f"n{i}"
        data.mkdir()
        settings = dataclasses.replace(
            raft_settings(data, addr),
            peers=[a for a in addrs if a != addr],
            replication_batch_ms=BATCH_MS,
        )
        nodes.append(RaftNode(settings, QueueStore(data / "state", 64), QueueStateMachine(), loop))
    for node in nodes:
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def _leader(nodes: list[RaftNode]) -> RaftNode:
    for _ in range(500):
        leaders = [n for n in nodes if n.status.role == "leader" and n.status.last_applied >= 2]
        if leaders and all(n.status.leader_addr for n in nodes):
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no leader: {[n.status for n in nodes]}")


def _on_disk(node: RaftNode, qid: str) -> bool:
    return any(qid.encode() in cmd for cmd, _idx, _term in node._logstore.load())


def _count_writes(node: RaftNode) -> list[int]:
    """Count `node`'s journal writes that add entries (the list's one item)."""
    count = [0]
    store = node._logstore
    write = store.write
    lock = threading.Lock()

    def counted(ops: list[tuple[str, int, int, bytes]], meta: Any) -> None:
        if any(op[0] == "add" for op in ops):
            with lock:
                count[0] += 1
        write(ops, meta)

    store.write = counted  # type: ignore[method-assign]
    return count


def _count_send_periods(node: RaftNode) -> list[int]:
    """Count the periods in which `node` sent log entries (the list's one item).

    A period is the part of a tick before our tick callback (pysyncobj's heartbeat)
    plus the poll before it, or the callback itself (the paced send): one journal
    flush at the callback's end covers both.
    """
    count = [0]
    transport = node._sync._SyncObj__transport
    send = transport.send
    period = [0]
    counted_period = [-1]
    after_tick = node._after_tick

    def ticking() -> None:
        period[0] += 1
        after_tick()
        period[0] += 1

    def counted(peer: Any, message: Any) -> bool:
        carries = message.get("type") == "append_entries" and message.get("entries")
        if carries and counted_period[0] != period[0]:
            counted_period[0] = period[0]
            count[0] += 1
        return bool(send(peer, message))

    transport.send = counted
    callbacks = node._sync._SyncObj__onTickCallbacks
    callbacks[callbacks.index(after_tick)] = ticking
    return count


def test_the_leader_flushes_once_per_round_and_answers_only_what_is_on_disk(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with three_nodes(tmp_path) as nodes:
            leader = await _leader(nodes)
            followers = [n for n in nodes if n is not leader]
            writes = _count_writes(leader)
            sends = _count_send_periods(leader)
            loop = asyncio.get_running_loop()
            problems: list[str] = []
            answers = []
            for i in range(40):
                qid = f"F{i:03d}"
                answer: asyncio.Future[Any] = loop.create_future()

                def done(result: Any, err: str | None, qid: str = qid, fut: Any = answer) -> None:
                    if err is None and not _on_disk(leader, qid):
                        problems.append(f"{qid} answered before the leader's journal had it")
                    if err is None and not any(_on_disk(f, qid) for f in followers):
                        problems.append(f"{qid} answered before a follower's journal had it")
                    fut.set_result(err)

                leader.submit_entry(encode_entry([enqueue(qid)]), done, early=True)
                answers.append(answer)
                await asyncio.sleep(0.002)  # one submission per tick, as from many sessions
            errors = await asyncio.wait_for(asyncio.gather(*answers), 30)
            assert errors == [None] * 40
            assert problems == []
            # One fsync per period that sent entries (a term or member write may add
            # one), not one per tick that appended a submission the pacer held back.
            assert writes[0] <= sends[0] + 2, (writes[0], sends[0])

    asyncio.run(scenario())


def test_a_follower_flushes_and_acks_before_it_applies(tmp_path: Path) -> None:
    """The ack is the leader's commit; applying the entries an append committed waited in
    front of it (pysyncobj applies before our tick callback) and delayed every 250."""

    async def scenario() -> None:
        async with three_nodes(tmp_path) as nodes:
            leader = await _leader(nodes)
            follower = next(n for n in nodes if n is not leader)
            dirty_at_apply: list[bool] = []
            apply = follower._machine.apply

            def watched(index: int, entry: bytes, txn: Any) -> Any:
                dirty_at_apply.append(follower._journal.dirty)
                return apply(index, entry, txn)

            follower._machine.apply = watched  # type: ignore[method-assign]
            loop = asyncio.get_running_loop()
            answers = []
            for i in range(40):
                answer: asyncio.Future[Any] = loop.create_future()

                def done(result: Any, err: str | None, fut: Any = answer) -> None:
                    fut.set_result(err)

                leader.submit_entry(encode_entry([enqueue(f"A{i:03d}")]), done, early=True)
                answers.append(answer)
                await asyncio.sleep(0.002)
            assert await asyncio.wait_for(asyncio.gather(*answers), 30) == [None] * 40
            for _ in range(100):  # the follower applies once the next round brings the commit
                if (
                    follower.status.commit_index >= leader.status.commit_index
                    and len(dirty_at_apply) >= 40
                ):
                    break
                await asyncio.sleep(0.02)
            assert len(dirty_at_apply) >= 40
            assert not any(dirty_at_apply), f"{sum(dirty_at_apply)} applies before the flush"

    asyncio.run(scenario())
