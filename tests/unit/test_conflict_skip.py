"""DeferringTransport: a mismatch answer skips the conflicting term; forwarded commands noted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mqnode.raft import DurableJournal
from mqnode.raft.logstore import LogStore
from mqnode.raft.transport import DeferringTransport


def journal_with_terms(path: Path, terms: list[int], applied: int) -> DurableJournal:
    j = DurableJournal(LogStore(path, map_size_mb=16))  # index 1 is the initial no-op
    for idx, term in enumerate(terms, start=2):
        j.add(b"x", idx, term)
    j.flush()
    j.applied_index = lambda: applied
    return j


def answer(j: DurableJournal, idx: int) -> Any:
    fake = SimpleNamespace(_syncObj=SimpleNamespace(_mq_journal=j))
    msg = {"type": "next_node_idx", "next_node_idx": idx, "success": False, "reset": True}
    return DeferringTransport._skip_conflicting_term(fake, msg)["next_node_idx"]


def test_skips_to_the_first_index_of_the_conflicting_term(tmp_path: Path) -> None:
    # indexes 2..4 term 1, 5..9 term 2 (uncommitted, from an old leader)
    j = journal_with_terms(tmp_path, [1, 1, 1, 2, 2, 2, 2, 2], applied=3)
    assert answer(j, 8) == 5


def test_never_asks_again_for_applied_entries(tmp_path: Path) -> None:
    # all of term 1; applied up to 6: the answer stays above it
    j = journal_with_terms(tmp_path, [1, 1, 1, 1, 1, 1, 1, 1], applied=6)
    assert answer(j, 9) == 7
    assert answer(j, 7) == 7  # the mismatch itself is the floor


def test_out_of_range_is_left_to_pysyncobj(tmp_path: Path) -> None:
    j = journal_with_terms(tmp_path, [1, 1], applied=1)
    assert answer(j, 40) == 40


def test_the_leader_notes_the_log_index_a_followers_command_got(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """What pacing.follower_waits is fed: pysyncobj's answer to a forwarded command."""
    sent: list[Any] = []
    monkeypatch.setattr("pysyncobj.transport.TCPTransport.send", lambda self, n, m: sent.append(m))
    t = DeferringTransport.__new__(DeferringTransport)
    t.mq_blocked, t.mq_follower_entry = frozenset(), 0
    t._syncObj = SimpleNamespace(_mq_journal=journal_with_terms(tmp_path, [1], applied=1))
    node = SimpleNamespace(address="127.0.0.1:1")
    t.send(node, {"type": "apply_command_response", "request_id": 1, "log_idx": 42, "log_term": 3})
    t.send(node, {"type": "apply_command_response", "request_id": 2, "error": 1})  # refused
    t.send(node, {"type": "apply_command_response", "request_id": 3, "log_idx": 40, "log_term": 3})
    assert t.mq_follower_entry == 42 and len(sent) == 3
