"""One RaftNode in-process (a one-member cluster on a loopback port): membership changes.

pysyncobj 0.3.17 means to allow one membership change at a time
(`SyncObj.__changeCluster` tests `__changeClusterIDx`), but nothing ever sets
that index, so it appends any number of changes back to back. The first test
pins that, the second shows `RaftNode.change_membership` refusing instead.
A one-member cluster makes "pending" deterministic: adding a node that never
answers needs 2 of 2 to commit, so the entry stays uncommitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mqnode.errors import MembershipError
from mqnode.raft import MEMBERSHIP, RaftNode, snapshot_file
from mqnode.raft.journal import NO_OP
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

from .raftkit import raft_settings, single_node

pytestmark = pytest.mark.timeout(60)


async def _in_tick(raft: RaftNode, action: Callable[[], Any]) -> Any:
    """Run `action` on the tick thread (pysyncobj is not thread-safe) and return its result."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        result = action()
        loop.call_soon_threadsafe(done.set_result, result)

    raft._tick_actions.append(run)
    raft.wake()
    return await asyncio.wait_for(done, 5)


def _membership_entries(raft: RaftNode) -> list[int]:
    j = raft._journal
    return [j[i][1] for i in range(len(j)) if j[i][0][:1] == MEMBERSHIP]


def test_pysyncobj_appends_a_second_change_while_the_first_is_pending(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with single_node(tmp_path) as (raft, (x, y)):
            sync = raft._sync

            def both() -> None:
                sync.addNodeToCluster(x)
                sync.addNodeToCluster(y)
                sync._checkCommandsToApply()

            await _in_tick(raft, both)
            assert len(await _in_tick(raft, lambda: _membership_entries(raft))) == 2
            assert raft.status.commit_index < _membership_entries(raft)[0]  # neither committed

    asyncio.run(scenario())


def test_change_membership_allows_one_pending_change(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with single_node(tmp_path) as (raft, (x, y)):
            with pytest.raises(MembershipError) as info:  # x does not answer: 1 of 2
                await raft.change_membership("add", x, timeout_s=5)
            assert info.value.kind == "refused" and "needs 2" in str(info.value)

            with pytest.raises(MembershipError) as info:  # told it is up: appended, stuck
                await raft.change_membership("add", x, timeout_s=0.5, target_up=True)
            assert info.value.kind == "timeout"
            with pytest.raises(MembershipError) as info:
                await raft.change_membership("add", y, timeout_s=5, target_up=True)
            assert info.value.kind == "refused" and f"add {x}" in str(info.value)
            assert len(await _in_tick(raft, lambda: _membership_entries(raft))) == 1
            assert sorted(raft.status.members) == sorted([raft._settings.self_addr, x])

    asyncio.run(scenario())


def test_the_member_list_survives_a_restart(tmp_path: Path) -> None:
    async def first() -> list[str]:
        async with single_node(tmp_path) as (raft, (x, _)):
            with pytest.raises(MembershipError):
                await raft.change_membership("add", x, timeout_s=0.3, target_up=True)
            return [raft._settings.self_addr, x]

    members = asyncio.run(first())

    async def second() -> None:
        # Started with peers=[] again: the stored list (with the pending add) wins.
        store = QueueStore(tmp_path / "state", 64)
        loop = asyncio.get_running_loop()
        raft = RaftNode(raft_settings(tmp_path, members[0]), store, QueueStateMachine(), loop)
        try:
            assert raft.start_peers == [members[1]]
        finally:
            raft.stop()
            store.close()

    asyncio.run(second())


def test_a_snapshot_start_makes_the_journal_durable_before_the_state(tmp_path: Path) -> None:
    """pysyncobj starts a snapshot before our tick's journal flush, with entries the last
    poll appended already applied; the copy's start commits the state, so the journal must
    be on disk first (else a kill -9 leaves the state ahead of the log)."""

    async def run() -> bool:
        async with single_node(tmp_path) as (raft, _spare):

            def start_snapshot_with_pending_entry() -> bool:
                j, store = raft._journal, raft._store
                j.add(NO_OP, j[-1][1] + 1, j[-1][2])  # appended by a poll, not flushed yet
                seen: list[bool] = []
                commit = store.snapshot_txn

                def spy() -> Any:
                    seen.append(j.dirty)
                    return commit()

                store.snapshot_txn = spy  # type: ignore[method-assign]
                try:
                    raft._snapshot_hooks.serialize("", (j[-2], j[-3], []))
                finally:
                    store.snapshot_txn = commit  # type: ignore[method-assign]
                    raft._snapshots.discard()
                return seen == [False]

            return bool(await _in_tick(raft, start_snapshot_with_pending_entry))

    assert asyncio.run(run()), "the state was committed with journal entries still pending"


def test_installing_a_snapshot_flushes_the_journal_before_the_state(tmp_path: Path) -> None:
    """Installing the leader's snapshot first commits what this node applied: the same
    journal-first rule as above."""

    async def run() -> bool:
        async with single_node(tmp_path) as (raft, _spare):

            def install_with_pending_entry() -> bool:
                j, store = raft._journal, raft._store
                copy = tmp_path / "leader-snapshot.bin"
                store.commit_apply()
                snapshot_file.write_snapshot(copy, store, j[-1], j[-2], [raft._settings.self_addr])
                j.add(NO_OP, j[-1][1] + 1, j[-1][2])  # appended by a poll, not flushed yet
                seen: list[bool] = []
                commit = store.commit_apply

                def spy() -> None:
                    seen.append(j.dirty)
                    commit()

                store.commit_apply = spy  # type: ignore[method-assign]
                try:
                    raft._snapshot_hooks.deserialize(str(copy))
                finally:
                    store.commit_apply = commit  # type: ignore[method-assign]
                return bool(seen) and not seen[0]

            return bool(await _in_tick(raft, install_with_pending_entry))

    assert asyncio.run(run()), "the state was committed with journal entries still pending"
