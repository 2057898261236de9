"""RaftStatus: indexes every tick, the operator fields at most every STATUS_SLOW_EVERY_S."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mqnode.raft.node import RaftNode

from .raftkit import single_node

pytestmark = pytest.mark.timeout(60)


async def _in_tick(raft: RaftNode[Any], fn: Callable[[], Any]) -> Any:
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    raft._tick_actions.append(lambda: loop.call_soon_threadsafe(done.set_result, fn()))
    raft.wake()
    return await asyncio.wait_for(done, 5)


def test_operator_fields_wait_for_their_period_indexes_do_not(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with single_node(tmp_path) as (raft, _):

            def publish_with(every: int, slow_due: float) -> Any:
                saved = raft._compaction.every, raft._applied_written
                raft._compaction.every = every  # an operator field (snapshot_after_entries)
                raft._applied_written += 1  # an index field (last_applied)
                raft._status_slow_due = slow_due
                raft._publish_status()
                status = raft.status
                raft._compaction.every, raft._applied_written = saved
                return status

            inside = await _in_tick(raft, lambda: publish_with(123_457, float("inf")))
            assert inside.last_applied == raft._applied_written + 1
            assert inside.snapshot_after_entries != 123_457  # not yet: inside the period
            after = await _in_tick(raft, lambda: publish_with(123_457, float("-inf")))
            assert after.snapshot_after_entries == 123_457
            assert after.role == "leader" and after.has_quorum

    asyncio.run(scenario())
