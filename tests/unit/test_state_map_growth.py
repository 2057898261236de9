"""A committed entry always applies: the state map grows past its size to make room.

A node whose LMDB map filled inside apply used to retry the same apply
forever: it could not apply anything more, not even the deletes that would
free space. Ingress refuses new mail well before the map fills
(`store_full_ratio`), but a node whose map is fuller than its peers' (free
pages held by a long snapshot copy, say) can still get there. One node in
process, a 1 MB state map, entries submitted straight to Raft (past
ingress's refusal).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from mqnode.raft import RaftNode
from mqnode.spool.commands import encode_entry

from .kit import enqueue
from .raftkit import single_node

pytestmark = pytest.mark.timeout(90)

BODY = b"Subject: big\r\n\r\n" + b"x" * 40_000 + b"\r\n"
MB = 1024 * 1024


def _submit_all(raft: RaftNode, ids: list[str]) -> None:
    """Submit without waiting: the entries of a tick that failed are answered
    "apply_failed" or not at all (callers have their own deadline, and ingress's
    idempotency key makes the client's retry safe); what counts is the state."""
    for qid in ids:
        raft.submit_entry(encode_entry([enqueue(qid, body=BODY)]), lambda *_: None)


async def _applied(raft: RaftNode, ids: list[str], within_s: float) -> list[str]:
    """The ids not in the committed state after waiting up to `within_s`."""
    missing = ids
    for _ in range(int(within_s / 0.05)):
        missing = [q for q in ids if raft._store.get_message(q) is None]
        if not missing:
            break
        await asyncio.sleep(0.05)
    return missing


def test_entries_past_a_full_map_apply_after_it_grows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [f"G{i:03d}" for i in range(36)]  # ~1.5 MB of bodies into a 1 MB map

    async def scenario() -> None:
        async with single_node(tmp_path, state_map_mb=1) as (raft, _):
            _submit_all(raft, ids)
            assert await _applied(raft, ids, 30) == []
            store = raft._store
            assert MB < store.map_size_bytes <= 2 * MB
            assert store._measure_fill() > 1.0  # on the configured size: ingress refuses

    with caplog.at_level(logging.WARNING, logger="mqnode.raft"):
        asyncio.run(scenario())
    assert "grown from 1.00 to 1.25 MB" in caplog.text


def test_past_twice_the_map_the_node_waits_for_a_bigger_one_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [f"H{i:03d}" for i in range(70)]  # ~2.9 MB: past twice the 1 MB map

    async def first() -> tuple[str, list[str]]:
        async with single_node(tmp_path, state_map_mb=1) as (raft, _):
            _submit_all(raft, ids)
            missing = await _applied(raft, ids, 5)
            assert missing != []  # stuck at the cap, waits
            assert raft._store.map_size_bytes == 2 * MB
            # Committed: in the journal on disk. A tick that fails in apply appends no
            # more submissions (never committed, never answered: their callers time out).
            journal = b"".join(cmd for cmd, _idx, _term in raft._logstore.load())
            committed = [q for q in ids if q.encode() in journal]
            assert set(missing) & set(committed)  # committed, but not applied
            return raft._settings.self_addr, committed

    with caplog.at_level(logging.ERROR, logger="mqnode.raft"):
        addr, committed = asyncio.run(first())
    assert caplog.text.count("restart this node with a larger state_map_size_mb") == 1

    async def second() -> None:
        async with single_node(tmp_path, state_map_mb=8, addr=addr) as (raft, _):
            assert await _applied(raft, committed, 20) == []

    asyncio.run(second())
