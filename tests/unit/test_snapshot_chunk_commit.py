"""An install-snapshot chunk never advances a follower's commit index over its own log."""

from __future__ import annotations

from mqnode.raft.transport import commit_unverified_no_further


def test_snapshot_chunk_commit_index_is_held_at_our_own() -> None:
    chunk = {"type": "append_entries", "term": 4, "commit_index": 1031, "serialized": (b"x", 0)}
    out = commit_unverified_no_further(chunk, 887)
    assert out["commit_index"] == 887
    assert chunk["commit_index"] == 1031  # the received message itself is left alone
    assert {k: v for k, v in out.items() if k != "commit_index"} == {
        k: v for k, v in chunk.items() if k != "commit_index"
    }


def test_verified_appends_and_other_messages_pass_unchanged() -> None:
    append = {"type": "append_entries", "term": 4, "commit_index": 1031, "prevLogIdx": 900}
    assert commit_unverified_no_further(append, 887) is append
    lower = {"type": "append_entries", "term": 4, "commit_index": 10, "serialized": None}
    assert commit_unverified_no_further(lower, 887) is lower
    vote = {"type": "request_vote", "term": 5}
    assert commit_unverified_no_further(vote, 887) is vote
    assert commit_unverified_no_further("not a dict", 887) == "not a dict"
