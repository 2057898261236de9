"""UnansweredCommands: callbacks pysyncobj holds but would never call are failed, once."""

from __future__ import annotations

from typing import Any

from pysyncobj import FAIL_REASON

from mqnode.raft import unanswered
from mqnode.raft.unanswered import UnansweredCommands


class FakeSync:
    """The two maps pysyncobj 0.3.17 keeps, under their mangled names."""

    def __init__(self) -> None:
        self._SyncObj__commandsWaitingReply: dict[int, Any] = {}
        self._SyncObj__commandsWaitingCommit: dict[int, list[tuple[int, Any]]] = {}
        self.raftLastApplied = 0


def _recorder() -> tuple[list[tuple[Any, int]], Any]:
    calls: list[tuple[Any, int]] = []
    return calls, lambda res, err: calls.append((res, err))


def test_entries_a_snapshot_jumped_over_are_failed_as_unknown() -> None:
    sync = FakeSync()
    calls, cb = _recorder()
    sync._SyncObj__commandsWaitingCommit.update({5: [(1, cb)], 9: [(1, cb)]})
    sync.raftLastApplied = 7  # installed a snapshot at 7: index 5 will never apply here
    u = UnansweredCommands(sync)
    assert u.sweep(100.0) == 1
    assert calls == [(None, FAIL_REASON.UNKNOWN_OUTCOME)]
    assert list(sync._SyncObj__commandsWaitingCommit) == [9]


def test_forwarded_commands_fail_when_the_leader_link_closes_or_after_a_bound() -> None:
    sync = FakeSync()
    calls, cb = _recorder()
    waiting = sync._SyncObj__commandsWaitingReply
    waiting.update({1: cb, 2: cb})
    u = UnansweredCommands(sync)
    assert u.fail_forwarded("link closed") == 2 and not waiting
    waiting[3] = cb
    u.sweep(100.0)
    assert 3 in waiting  # young: its answer may still come
    u.sweep(100.0 + unanswered.FORWARD_ANSWER_MAX_S + 1)
    assert not waiting and len(calls) == 3
    assert u.failed_total == 3


def test_a_leaders_copy_of_a_peers_request_is_not_called() -> None:
    sync = FakeSync()
    sync._SyncObj__commandsWaitingCommit[1] = [(1, ("node", 7))]
    sync.raftLastApplied = 2
    assert UnansweredCommands(sync).sweep(1.0) == 1  # dropped, nothing to call
