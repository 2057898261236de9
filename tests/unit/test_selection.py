"""admin/selection.py: a queue command's selection reads a queue of any size in pages, finds
every match (no cap), never the same message twice, and decodes only when a filter asks."""

from __future__ import annotations

import pytest

from mqnode.admin import selection
from mqnode.admin.selection import Filter, select_ids, select_messages
from mqnode.spool.commands import QueueOp
from mqnode.spool.model import MessageState, QueuedMessage
from mqnode.spool.store import QueueStore

from .kit import T0, Transcript, enqueue, outcome


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "PAGE", 3)


def _queue(tx: Transcript) -> None:
    for i in range(10):
        tx.one(enqueue(f"D{i:02d}", at_ms=T0 + i, rcpts=("x@dead.test",)))
    for i in range(4):
        tx.one(enqueue(f"L{i:02d}", at_ms=T0 + i, rcpts=("x@live.test",)))
    tx.one(enqueue("BOUNCE", at_ms=T0, rcpts=("x@dead.test",), mail_from=""))
    tx.one(enqueue("BOTH", at_ms=T0, rcpts=("x@live.test", "y@Dead.Test")))


def test_a_domain_selection_finds_every_match_across_pages(
    tx: Transcript, store: QueueStore
) -> None:
    _queue(tx)
    tx.one(QueueOp("hold", ("D03",), T0))  # held mail is in the domain's selection too
    ids = select_ids(store, Filter.parse(None, "dead.test", None))
    assert sorted(ids) == sorted([f"D{i:02d}" for i in range(10)] + ["BOUNCE", "BOTH"])
    assert len(ids) == len(set(ids))
    assert sorted(select_ids(store, Filter.parse(None, "LIVE.test", None))) == [
        "BOTH",
        "L00",
        "L01",
        "L02",
        "L03",
    ]
    assert select_ids(store, Filter.parse(None, "nowhere.test", None)) == []


def test_filters_decode_and_match(tx: Transcript, store: QueueStore) -> None:
    _queue(tx)
    tx.one(QueueOp("hold", ("D03", "L01"), T0))
    tx.one(outcome("D05", [(0, "deferred", "4.4.1 no answer")], T0 + 100, next_ms=T0 + 10_000))
    assert select_ids(store, Filter.parse("hold", None, None)) == ["D03", "L01"]
    assert select_ids(store, Filter.parse("deferred", "dead.test", None)) == ["D05"]
    assert select_ids(store, Filter.parse(None, None, "<>")) == ["BOUNCE"]
    assert select_ids(store, Filter.parse(None, "dead.test", "")) == ["BOUNCE"]
    everything = select_ids(store, Filter())
    assert len(everything) == 16 and everything == sorted(everything)  # queue id order


def test_a_listing_stops_at_its_limit(tx: Transcript, store: QueueStore) -> None:
    _queue(tx)
    assert [m.queue_id for m in select_messages(store, Filter(), 4)] == [
        "BOTH",
        "BOUNCE",
        "D00",
        "D01",
    ]
    held = select_messages(store, Filter.parse("hold", None, None), 5)
    assert held == []
    some = select_messages(store, Filter.parse(None, "dead.test", None), 5)
    assert len(some) == 5 and all(m.state() is MessageState.ACTIVE for m in some)


def test_a_message_whose_key_moves_behind_the_read_position_is_selected_once(
    tx: Transcript, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message held while its domain is being read moves to the end of the domain's
    index, where the selection meets it again: it is listed once."""
    _queue(tx)
    read = store.domain_id_page
    pages: list[list[str]] = []

    def and_hold(domain: str, after: bytes, limit: int) -> tuple[list[str], bytes]:
        ids, last = read(domain, after, limit)
        pages.append(ids)
        tx.one(QueueOp("hold", tuple(ids), T0))  # another operator, meanwhile
        return ids, last

    monkeypatch.setattr(store, "domain_id_page", and_hold)
    ids = select_ids(store, Filter.parse(None, "dead.test", None))
    assert sum(map(len, pages)) > len(ids) == len(set(ids)) == 12


def test_a_state_is_read_only_until_its_counter_is_met(
    tx: Transcript, store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing the held mail of a queue that holds none decodes nothing; with one held
    message, the reading stops at the page that had it."""
    _queue(tx)
    read = store.messages
    decoded: list[str] = []

    def counting(ids: list[str]) -> list[QueuedMessage]:
        decoded.extend(ids)
        return read(ids)

    monkeypatch.setattr(store, "messages", counting)
    assert select_messages(store, Filter.parse("hold", None, None), 10) == []
    assert select_ids(store, Filter.parse("hold", "dead.test", None)) == []
    assert decoded == []
    tx.one(QueueOp("hold", ("D01",), T0))  # ids: BOTH, BOUNCE, D00 | D01, ...
    assert select_ids(store, Filter.parse("hold", None, None)) == ["D01"]
    assert decoded == ["BOTH", "BOUNCE", "D00", "D01", "D02", "D03"]


def test_bad_fields_are_refused() -> None:
    for state, domain, sender in (("gone", None, None), (None, 3, None), (None, None, ["x"])):
        with pytest.raises(ValueError):
            Filter.parse(state, domain, sender)
