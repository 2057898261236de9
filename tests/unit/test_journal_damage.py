"""A Raft log entry damaged on disk while the node runs stops the node.

The journal keeps only its newest commands in memory and reads older ones back
from LMDB (raft/journal.py). One damaged after the start checked them all must
not be retried every tick: RaftNode treats JournalDamagedError as fatal, as it
does a newer format. Here: one node in process whose journal holds no commands
in memory, entries damaged in its LMDB log, then a compaction that reads the
log's new first entries back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import pytest

from mqnode.errors import JournalDamagedError, MqnodeError
from mqnode.raft import RaftNode
from mqnode.spool.commands import encode_entry
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

from .kit import enqueue
from .raftkit import free_addrs, raft_settings

pytestmark = pytest.mark.timeout(60)

EVERY = 20  # snapshot period, in entries


def test_a_damaged_entry_read_back_while_running_stops_the_node(tmp_path: Path) -> None:
    async def run() -> None:
        settings = dataclasses.replace(
            raft_settings(tmp_path, free_addrs(1)[0]), log_compaction_min_entries=EVERY
        )
        store = QueueStore(tmp_path / "state", 64)
        loop = asyncio.get_running_loop()
        raft = RaftNode(settings, store, QueueStateMachine(), loop)
        fatal: list[MqnodeError] = []
        raft.on_fatal = fatal.append
        raft._journal._budget = 0  # every flushed command read back from disk
        raft.start()
        try:
            for _ in range(200):
                if raft.status.role == "leader":
                    break
                await asyncio.sleep(0.02)

            async def until(done: asyncio.Event) -> None:
                """`done`, or the node stopped (its tick thread runs no more callbacks)."""
                for _ in range(500):
                    if done.is_set() or fatal:
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("neither done nor stopped")

            async def submit(k: int) -> None:
                done = asyncio.Event()
                raft.submit_entry(encode_entry([enqueue(f"Q{k}")]), lambda *_: done.set())
                await until(done)

            damaged: set[bytes] = set()

            def damage(done: asyncio.Event) -> None:  # on the tick thread, between writes
                env = raft._logstore._env
                log = env.open_db(b"log")
                with env.begin(write=True) as txn:
                    for key, raw in list(txn.cursor(db=log)):
                        if struct.unpack(">Q", key)[0] > 2 and key not in damaged:
                            txn.put(key, bytes(raw[:-1]) + bytes([raw[-1] ^ 0xFF]), db=log)
                            damaged.add(bytes(key))
                loop.call_soon_threadsafe(done.set)

            # Each entry is damaged once it is on disk, so the compaction that comes after
            # a snapshot finds its new first entries damaged when it reads them back.
            for k in range(3 * EVERY):
                if fatal:
                    break
                await submit(k)
                done = asyncio.Event()
                raft._run_on_tick(lambda done=done: damage(done))
                await until(done)
            assert fatal and isinstance(fatal[0], JournalDamagedError), (fatal, raft.status)
            assert "checksum" in str(fatal[0])
        finally:
            raft.stop()
            store.close()

    asyncio.run(run())
