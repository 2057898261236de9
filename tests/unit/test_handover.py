"""handover.py: a leadership transfer asked again while the target catches up, and the
entries held meanwhile.

pysyncobj denies a transfer unless the target's match index equals the leader's last
index at that instant, so a follower a few entries behind (lease renewals append all the
time) is refused; the retry turns that race into a short wait. The hold keeps the log from
growing past the target's while it stands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mqnode.raft.handover import AppendHold, retry_while_behind


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _asker(
    answers: list[str], clock: _Clock, step_s: float
) -> tuple[list[str], Callable[[], Awaitable[str]]]:
    asked: list[str] = []

    async def ask() -> str:
        clock.now += step_s
        answer = answers[min(len(asked), len(answers) - 1)]
        asked.append(answer)
        return answer

    return asked, ask


def test_a_target_that_catches_up_gets_the_transfer() -> None:
    clock = _Clock()
    asked, ask = _asker(["behind", "behind", "requested"], clock, 0.01)
    result = asyncio.run(retry_while_behind(ask, clock, 2.0, 0.0))
    assert result == "requested"
    assert asked == ["behind", "behind", "requested"]


def test_a_target_that_never_catches_up_is_denied_within_the_retry_time() -> None:
    clock = _Clock()
    asked, ask = _asker(["behind"], clock, 0.05)
    result = asyncio.run(retry_while_behind(ask, clock, 2.0, 0.0))
    assert result == "denied"
    assert 30 <= len(asked) <= 41  # 2 s of 50 ms asks, bounded


def test_other_answers_are_not_retried() -> None:
    for answer in ("denied", "timeout", "requested"):
        clock = _Clock()
        asked, ask = _asker([answer], clock, 0.01)
        assert asyncio.run(retry_while_behind(ask, clock, 2.0, 0.0)) == answer
        assert asked == [answer]


def test_nothing_is_held_without_a_hold() -> None:
    hold: AppendHold[int] = AppendHold()
    assert not hold.offer(1)
    assert hold.due(0.0, other_leads=lambda: False) == []


def test_held_entries_go_on_in_order_when_another_node_leads() -> None:
    hold: AppendHold[int] = AppendHold()
    hold.hold_until(10.0)
    assert hold.offer(1) and hold.offer(2)
    assert hold.due(5.0, other_leads=lambda: False) == []
    assert hold.due(5.0, other_leads=lambda: True) == [1, 2]
    assert not hold.offer(3)  # the hold is over


def test_a_hold_ends_at_its_time_whatever_else_happens() -> None:
    hold: AppendHold[int] = AppendHold()
    hold.hold_until(10.0)
    assert hold.offer(1)
    assert hold.due(9.9, other_leads=lambda: False) == []
    assert hold.due(10.0, other_leads=lambda: False) == [1]


def test_moving_the_end_into_the_past_releases_at_the_next_look() -> None:
    hold: AppendHold[int] = AppendHold()
    hold.hold_until(10.0)
    assert hold.offer(1)
    hold.hold_until(0.0)  # the transfer was denied
    assert hold.offer(2)  # still held until the tick looks
    assert hold.due(1.0, other_leads=lambda: False) == [1, 2]
    assert not hold.offer(3)
