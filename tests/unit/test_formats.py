"""formats: the cluster's reads level, and DSN fields kept out of the log below level 2."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from mqnode.clock import ManualClock
from mqnode.raft.formats import LEVEL_CACHE_S, LevelGate, announce_again, cluster_level
from mqnode.raft.settings import APPEND_BATCH_BYTES
from mqnode.spool.commands import BIG_ENTRIES, BIG_ENTRIES_LEVEL, SMALL_ENTRIES

from .kit import Recorder, enqueue

MEMBERS = ("a:1", "b:1", "c:1")


def test_the_lowest_member_counts_and_one_that_never_said_is_the_first_release() -> None:
    assert cluster_level({m: {"reads": 2} for m in MEMBERS}, MEMBERS) == 2
    assert cluster_level({"a:1": {"reads": 2}, "b:1": {"reads": 2}}, MEMBERS) == 1
    assert cluster_level({"a:1": {"reads": 2}, "b:1": {}, "c:1": {"reads": 3}}, MEMBERS) == 1
    # a removed member's old entry does not hold the cluster back
    nodes = {m: {"reads": 2} for m in MEMBERS} | {"old:1": {"reads": 1}}
    assert cluster_level(nodes, MEMBERS) == 2


def test_dsn_fields_are_dropped_below_level_two_and_kept_from_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        level = [1]
        clock = ManualClock()
        rec = Recorder()
        gate = LevelGate(rec, lambda: level[0], clock)
        with_dsn = replace(enqueue("Q1"), dsn_envid="E", dsn_notify=("NEVER",))
        plain = enqueue("Q2")
        with caplog.at_level(logging.WARNING, logger="mqnode.raft.formats"):
            await gate.submit(with_dsn)
            await gate.submit(plain)
        assert rec.got == [enqueue("Q1"), plain], "queued, without its DSN fields"
        assert "DSN parameters not kept" in caplog.text
        level[0] = 2
        assert gate.level() == 1, "the level is read at most once a second"
        await gate.submit(with_dsn)
        assert rec.got[-1] == with_dsn, "but read again before dropping anything"

    asyncio.run(run())


def test_a_node_announces_again_when_its_entry_is_wrong_or_another_member_rose() -> None:
    mine = {"node_id": "n1", "smtp_addr": "s:1", "reads": 2}
    ok = {"a:1": dict(mine), "b:1": {"reads": 2}, "c:1": {"reads": 2}}
    # After a start (nothing seen yet) members above level 1 count as a rise: once.
    again, seen = announce_again(ok, {}, "a:1", mine)
    assert again
    assert announce_again(ok, seen, "a:1", mine) == (False, seen), "settles"
    # b was on the first release (level 1) when we announced; it has been upgraded since.
    old_b = ok | {"b:1": {}}
    _, seen = announce_again(old_b, {}, "a:1", mine)
    assert announce_again(ok, seen, "a:1", mine)[0]
    # Our own entry lost (a snapshot from a first-release member) or from another release.
    assert announce_again(ok | {"a:1": {"node_id": "n1", "smtp_addr": "s:1"}}, seen, "a:1", mine)[0]
    assert announce_again({k: v for k, v in ok.items() if k != "a:1"}, seen, "a:1", mine)[0]


def test_entries_stay_small_until_every_member_reads_big_ones() -> None:
    level = [BIG_ENTRIES_LEVEL - 1]
    clock = ManualClock()
    gate = LevelGate(Recorder(), lambda: level[0], clock)
    assert gate.entry_sizes() == SMALL_ENTRIES
    level[0] = BIG_ENTRIES_LEVEL
    clock.advance(LEVEL_CACHE_S)
    assert gate.entry_sizes() == BIG_ENTRIES
    # what an older member can send on: pysyncobj's 64 KiB batch holds the small sizes
    assert SMALL_ENTRIES.max_entry < 64 * 1024 and BIG_ENTRIES.max_entry < APPEND_BATCH_BYTES
