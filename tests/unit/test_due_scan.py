"""QueueStore.iter_due_by_domain, the dispatcher's deep and shaped scans: domain by
domain, round robin, a passed-over domain costing one seek however long its backlog;
and the per-domain due index it reads, built for a state written without it."""

from __future__ import annotations

from mqnode.spool.commands import QueueOp
from mqnode.spool.store import DUE_BY_DOMAIN, QueueStore

from .kit import T0, Transcript, dump, enqueue, open_store, outcome

NOW = T0 + 1_000


def _scan(
    store: QueueStore,
    passed: frozenset[str] = frozenset(),
    limit: int = 100,
    max_examined: int = 1_000,
    start_after: str = "",
    stopped: list[str] | None = None,
) -> list[str]:
    due = store.iter_due_by_domain(
        NOW, limit, (), max_examined, lambda d: d in passed, start_after, stopped
    )
    return [m.queue_id for m in due]


def test_domains_come_in_name_order_each_oldest_first(tx: Transcript, store: QueueStore) -> None:
    tx.one(enqueue("B1", at_ms=T0 + 1, rcpts=("x@b.test",)))
    tx.one(enqueue("A2", at_ms=T0 + 2, rcpts=("x@a.test",)))
    tx.one(enqueue("A1", at_ms=T0 + 0, rcpts=("x@A.Test",)))  # domains are lowercased
    tx.one(enqueue("LATER", at_ms=NOW + 1, rcpts=("x@a.test",)))  # not due
    assert _scan(store) == ["A1", "A2", "B1"]


def test_a_passed_domain_costs_one_seek_however_long_its_backlog(
    tx: Transcript, store: QueueStore
) -> None:
    """A paced site's million messages: the scan jumps over them to other mail."""
    for i in range(300):
        tx.one(enqueue(f"P{i:03d}", at_ms=T0 + i, rcpts=("x@paced.test",)))
    tx.one(enqueue("OTHER", at_ms=T0 + 500, rcpts=("x@zother.test",)))
    assert _scan(store, frozenset({"paced.test"}), max_examined=3) == ["OTHER"]
    assert _scan(store, max_examined=3) == ["P000", "P001", "P002"]


def test_passed_is_asked_after_each_message(tx: Transcript, store: QueueStore) -> None:
    """The caller's plan fills a domain mid-way: the scan moves on at once."""
    for i in range(5):
        tx.one(enqueue(f"A{i}", at_ms=T0 + i, rcpts=("x@a.test",)))
    tx.one(enqueue("B0", at_ms=T0 + 9, rcpts=("x@b.test",)))
    full: set[str] = set()
    taken = []
    due = store.iter_due_by_domain(NOW, 100, (), 1_000, lambda d: d in full)
    for msg in due:
        taken.append(msg.queue_id)
        if len(taken) == 2:
            full.add("a.test")
    assert taken == ["A0", "A1", "B0"]


def test_round_robin_starts_after_the_domain_the_last_scan_stopped_in(
    tx: Transcript, store: QueueStore
) -> None:
    for domain in ("a", "b", "c"):
        for i in range(2):
            tx.one(enqueue(f"{domain.upper()}{i}", at_ms=T0 + i, rcpts=(f"x@{domain}.test",)))
    stopped: list[str] = []
    assert _scan(store, limit=3, stopped=stopped) == ["A0", "A1", "B0"]
    assert stopped == ["b.test"]
    assert _scan(store, limit=3, start_after="b.test", stopped=stopped) == ["C0", "C1", "A0"]
    assert stopped == ["a.test"]
    # A scan that saw every domain leaves no place to resume from.
    everything = ["B0", "B1", "C0", "C1", "A0", "A1"]
    assert _scan(store, start_after="a.test", stopped=stopped) == everything
    assert stopped == []
    # A scan whose budget ran out tells where it stopped.
    assert _scan(store, max_examined=1, stopped=stopped) == ["A0"]
    assert stopped == ["a.test"]


def test_a_message_for_several_domains_comes_once_and_leaves_a_domain_once_delivered_there(
    tx: Transcript, store: QueueStore
) -> None:
    tx.one(enqueue("M", at_ms=T0, rcpts=("x@a.test", "y@b.test", "z@b.test")))
    assert _scan(store) == ["M"]
    assert _scan(store, frozenset({"a.test"})) == ["M"]
    tx.one(outcome("M", [(0, "delivered", "250 ok")], T0 + 1, next_ms=T0 + 2))
    assert _scan(store, frozenset({"b.test"})) == []
    assert _scan(store) == ["M"]


def test_held_mail_is_never_due_but_listed_for_its_domain(
    tx: Transcript, store: QueueStore
) -> None:
    tx.one(enqueue("M", at_ms=T0, rcpts=("x@a.test",)))
    tx.one(enqueue("N", at_ms=T0 + 1, rcpts=("y@a.test", "z@b.test")))
    tx.one(QueueOp("hold", ("M",), T0 + 1))
    assert _scan(store) == ["N"]
    assert store.domain_id_page("A.test", b"", 10) == (["N", "M"], b"")
    assert store.domain_id_page("b.test", b"", 10) == (["N"], b"")
    assert store.domain_id_page("c.test", b"", 10) == ([], b"")
    assert store.domain_id_page("a.tes", b"", 10) == ([], b"")  # a prefix is not the domain
    first, after = store.domain_id_page("a.test", b"", 1)
    assert first == ["N"] and after
    second, after = store.domain_id_page("a.test", after, 1)
    assert second == ["M"]
    assert store.domain_id_page("a.test", after, 1) == ([], b"")
    tx.one(QueueOp("release", ("M",), T0 + 2))
    assert _scan(store) == ["N", "M"]  # released: due from the release on


def test_a_state_written_without_the_index_gets_it_at_open(
    tx: Transcript, store: QueueStore
) -> None:
    """A state (or an installed snapshot) from a node without the per-domain index."""
    tx.one(enqueue("M1", at_ms=T0, rcpts=("x@a.test", "y@b.test")))
    tx.one(enqueue("M2", at_ms=T0 + 1, rcpts=("x@a.test",)))
    tx.one(QueueOp("hold", ("M2",), T0 + 2))
    whole = dump(store)
    assert len(whole["due_by_domain"]) == 3  # M1 twice, and the held M2
    txn = store.apply_txn()._txn
    txn.drop(store._due_by_domain, delete=False)
    txn.delete(DUE_BY_DOMAIN.encode(), db=store._meta)
    store.commit_apply()
    assert dump(store)["due_by_domain"] == []
    store.close()
    again = open_store(store.path)
    try:
        assert dump(again) == whole
        assert [m.queue_id for m in again.iter_due_by_domain(NOW, 10, (), 100, bool)] == []
        due = again.iter_due_by_domain(NOW, 10, (), 100, lambda d: False)
        assert [m.queue_id for m in due] == ["M1"]
    finally:
        again.close()
