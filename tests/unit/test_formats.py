"""formats: the cluster's reads level, and DSN fields kept out of the log below level 2."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from mqnode.clock import ManualClock
from mqnode.commands import Command
from mqnode.formats import LEVEL_CACHE_S, LevelGate, cluster_level
from mqnode.statemachine import Result

from .kit import enqueue

MEMBERS = ("a:1", "b:1", "c:1")


def test_the_lowest_member_counts_and_one_that_never_said_is_the_first_release() -> None:
    assert cluster_level({m: {"reads": 2} for m in MEMBERS}, MEMBERS) == 2
    assert cluster_level({"a:1": {"reads": 2}, "b:1": {"reads": 2}}, MEMBERS) == 1
    assert cluster_level({"a:1": {"reads": 2}, "b:1": {}, "c:1": {"reads": 3}}, MEMBERS) == 1
    # a removed member's old entry does not hold the cluster back
    nodes = {m: {"reads": 2} for m in MEMBERS} | {"old:1": {"reads": 1}}
    assert cluster_level(nodes, MEMBERS) == 2


class Recorder:
    def __init__(self) -> None:
        self.got: list[Command] = []

    async def submit(self, cmd: Command) -> Result:
        self.got.append(cmd)
        return ("queued", "Q")


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
        with caplog.at_level(logging.WARNING, logger="mqnode.formats"):
            await gate.submit(with_dsn)
            await gate.submit(plain)
        assert rec.got == [enqueue("Q1"), plain], "queued, without its DSN fields"
        assert "DSN parameters not kept" in caplog.text
        level[0] = 2
        await gate.submit(with_dsn)
        assert rec.got[-1] == enqueue("Q1"), "the level is read at most once a second"
        clock.advance(LEVEL_CACHE_S)
        await gate.submit(with_dsn)
        assert rec.got[-1] == with_dsn

    asyncio.run(run())
