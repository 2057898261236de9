"""One RaftNode in-process: a one-member cluster on a loopback port that leads at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mqnode.devtools.localports import free_loopback_ports
from mqnode.raft import RaftNode, RaftSettings
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore


def free_addrs(n: int) -> list[str]:
    """Loopback Raft addresses below the ephemeral range (devtools.localports): a port found by
    binding to 0 could be given to an outbound connection before the node binds it (seen in
    a fresh-clone run: BindError, then pysyncobj's unclosed socket failing a later test)."""
    return [f"127.0.0.1:{p}" for p in free_loopback_ports(n)]


def raft_settings(tmp_path: Path, addr: str) -> RaftSettings:
    return RaftSettings(
        self_addr=addr,
        peers=[],
        secret="unit-test-cluster-secret-0123456789",
        data_dir=tmp_path,
        election_timeout_min_ms=100,
        election_timeout_max_ms=200,
        heartbeat_ms=20,
        leader_fallback_ms=1000,
        log_compaction_min_entries=10_000,
        log_compaction_min_time_s=3600,
        raft_map_size_mb=16,
    )


@asynccontextmanager
async def single_node(
    tmp_path: Path, state_map_mb: int = 64, addr: str | None = None
) -> AsyncIterator[tuple[RaftNode, list[str]]]:
    """A started one-member RaftNode that leads; yields it and two unused addresses.

    `addr`: the address of an earlier run on the same data (a restart)."""
    first, *spare = free_addrs(3)
    addr = addr or first
    store = QueueStore(tmp_path / "state", state_map_mb)
    loop = asyncio.get_running_loop()
    raft = RaftNode(raft_settings(tmp_path, addr), store, QueueStateMachine(), loop)
    raft.start()
    try:
        for _ in range(200):
            if raft.status.role == "leader" and raft.status.last_applied >= 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"a one-member cluster did not elect itself: {raft.status}")
        yield raft, spare
    finally:
        raft.stop()
        store.close()
