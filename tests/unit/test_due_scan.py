"""QueueStore.iter_due for the dispatcher's scans with traffic shaping: the run of
entries passed over at the head is reported, and a scan can start past it."""

from __future__ import annotations

from mqnode.spool.store import QueueStore

from .kit import T0, Transcript, enqueue


def test_a_scan_can_start_past_the_backlog_it_passed_over(
    tx: Transcript, store: QueueStore
) -> None:
    """The dispatcher's shaped scans (delivery/dispatcher.py): the run of skipped entries
    at the head is reported, and a scan can start after it."""
    for i in range(6):
        tx.one(enqueue(f"B{i}", at_ms=T0 + i))
    tx.one(enqueue("OTHER", at_ms=T0 + 10))
    head: list[bytes] = []
    backlog = {f"B{i}" for i in range(6)}
    got = [m.queue_id for m in store.iter_due(T0 + 100, 10, backlog, None, b"", head)]
    assert got == ["OTHER"] and head and head[0].endswith(b"B5")
    after = [m.queue_id for m in store.iter_due(T0 + 100, 10, (), None, head[0])]
    assert after == ["OTHER"]
    assert list(store.iter_due(T0 + 100, 10, (), None, b"\xff" * 9)) == []


def test_entries_the_caller_passes_over_after_reading_them_extend_the_run(
    tx: Transcript, store: QueueStore
) -> None:
    for i in range(4):
        tx.one(enqueue(f"B{i}", at_ms=T0 + i))
    tx.one(enqueue("OTHER", at_ms=T0 + 10))
    tx.one(enqueue("B9", at_ms=T0 + 20))
    passed: set[str] = set()
    head: list[bytes] = []
    taken = []
    for msg in store.iter_due(T0 + 100, 10, passed, None, b"", head):
        if msg.queue_id.startswith("B"):
            passed.add(msg.queue_id)  # as the dispatcher marks a blocked site's mail
        else:
            taken.append(msg.queue_id)
    assert taken == ["OTHER"]
    assert head and head[0].endswith(b"B3")  # the run ends where mail was taken
