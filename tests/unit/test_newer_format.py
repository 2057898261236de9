"""A node meeting an entry a newer mqnode wrote stops applying; it never skips it.

Skipping (what the previous release did with any undecodable entry) lets the
node's queue diverge from its upgraded peers'. Here: one node in process, an
entry with a command tag past this version's submitted straight to Raft.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest

from mqnode.errors import MqnodeError, NewerFormatError
from mqnode.raft import RaftNode
from mqnode.spool.commands import FORMAT_VERSION, encode_entry
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

from .kit import enqueue
from .raftkit import raft_settings, single_node

pytestmark = pytest.mark.timeout(60)

NEWER = bytes([FORMAT_VERSION]) + msgpack.packb([[99, "from a newer mqnode"]])


async def _fatal_within(fatal: list[MqnodeError], seconds: float) -> None:
    for _ in range(int(seconds / 0.02)):
        if fatal:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the node kept going past an entry it cannot read")


def test_the_node_stops_before_the_newer_entry_and_again_after_a_restart(tmp_path: Path) -> None:
    async def run() -> None:
        async with single_node(tmp_path) as (raft, _):
            fatal: list[MqnodeError] = []
            raft.on_fatal = fatal.append
            done = asyncio.Event()
            raft.submit_entry(encode_entry([enqueue("Q1")]), lambda *_: done.set())
            await asyncio.wait_for(done.wait(), 10)
            applied = raft._store.applied_index()
            raft.submit_entry(NEWER, lambda *_: None)
            raft.submit_entry(encode_entry([enqueue("Q2")]), lambda *_: None)
            await _fatal_within(fatal, 10)
            assert isinstance(fatal[0], NewerFormatError)
            assert raft._store.applied_index() == applied, "applied past the newer entry"
            assert raft._store.get_message("Q1") is not None
            assert raft._store.get_message("Q2") is None
            addr = raft._settings.self_addr
        # The entry is in the journal: the same version stops at it again, it never skips.
        async with single_node_unchecked(tmp_path, addr) as (raft, fatal):
            await _fatal_within(fatal, 10)
            assert raft._store.applied_index() == applied

    asyncio.run(run())


@asynccontextmanager
async def single_node_unchecked(
    tmp_path: Path, addr: str
) -> AsyncIterator[tuple[RaftNode, list[MqnodeError]]]:
    """single_node's restart without waiting to lead (it may stop before it does)."""
    store = QueueStore(tmp_path / "state", 64)
    raft = RaftNode(
        raft_settings(tmp_path, addr), store, QueueStateMachine(), asyncio.get_running_loop()
    )
    fatal: list[MqnodeError] = []
    raft.on_fatal = fatal.append
    raft.start()
    try:
        yield raft, fatal
    finally:
        raft.stop()
        store.close()
