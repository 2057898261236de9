"""The follower's answer to a log mismatch: skip the conflicting term, never below applied."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mqnode.logstore import LogStore
from mqnode.raft import DurableJournal
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
