"""When RaftNode answers a submission: before or after the state's LMDB commit.

SMTP ingress submits with `early=True`: its 250 waits for the commit (the
journals of a majority) but not for the state's fsync. Everything else (a
claim the dispatcher then reads back, an operator's hold) is answered only
once the state commit is readable, and `on_applied` follows every state
commit that moved on. The state commit is held on a gate here, so "answered
before it" is shown, not timed.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from mqnode.raft import RaftNode
from mqnode.spool.commands import encode_entry

from .kit import enqueue
from .raftkit import single_node

pytestmark = pytest.mark.timeout(60)


def _gate_state_commit(raft: RaftNode) -> threading.Event:
    """Hold the state commit of anything applied after now until the event is set."""
    gate = threading.Event()
    store = raft._store
    commit = store.commit_apply
    before = raft.status.last_applied

    def gated(refresh_fill: bool = False) -> None:
        if raft._sync.raftLastApplied > before:
            gate.wait(10)
        commit(refresh_fill)

    store.commit_apply = gated  # type: ignore[method-assign]
    return gate


def _submit(raft: RaftNode, qid: str, early: bool) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Any] = loop.create_future()

    def done(result: Any, err: str | None) -> None:
        answer.set_result((result, err))

    raft.submit_entry(encode_entry([enqueue(qid)]), done, early=early)
    return answer


def test_an_early_submission_is_answered_before_the_state_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with single_node(tmp_path) as (raft, _):
            applied = asyncio.Event()
            raft.on_applied = applied.set
            gate = _gate_state_commit(raft)
            try:
                result, err = await asyncio.wait_for(_submit(raft, "Q1", early=True), 5)
                assert err is None and result[0] == ("queued", "Q1")
                assert raft._store.get_message("Q1") is None  # the state commit is held
                assert not applied.is_set()
            finally:
                gate.set()
            await asyncio.wait_for(applied.wait(), 5)
            assert raft._store.get_message("Q1") is not None

    asyncio.run(scenario())


def test_other_submissions_are_answered_once_the_state_is_readable(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with single_node(tmp_path) as (raft, _):
            gate = _gate_state_commit(raft)
            try:
                answer = _submit(raft, "Q2", early=False)
                await asyncio.sleep(0.3)  # the entry commits and applies meanwhile
                assert not answer.done()
            finally:
                gate.set()
            result, err = await asyncio.wait_for(answer, 5)
            assert err is None and result[0] == ("queued", "Q2")
            assert raft._store.get_message("Q2") is not None

    asyncio.run(scenario())
