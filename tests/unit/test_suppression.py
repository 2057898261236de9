"""The suppression list: entries normalised the same everywhere, applied through the state
machine into LMDB, looked up most specific first, expired, listed in pages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.spool.commands import Suppress, decode_entry, encode_entry
from mqnode.spool.store import QueueStore
from mqnode.spool.suppression import (
    ENTRIES_PER_COMMAND,
    SuppressionError,
    invalid_item,
    lookup_keys,
    make_entry,
    normalise_scope,
    normalise_target,
)

from .kit import T0, Transcript, enqueue


def add(*entries: tuple[str, str, int], at: int = T0) -> Suppress:
    items = tuple(
        make_entry(t, scope, "r", "manual", at, exp).as_command_item() for t, scope, exp in entries
    )
    return Suppress("add", items, at)


def test_targets_are_normalised() -> None:
    assert normalise_target("Bob@Example.ORG") == "bob@example.org"
    assert normalise_target("<bob@example.org>") == "bob@example.org"
    assert normalise_target("example.org") == "@example.org"
    assert normalise_target("@Example.org") == "@example.org"
    assert normalise_target("jöran@bücher.example") == "jöran@xn--bcher-kva.example"
    assert normalise_scope("@Shop.Example") == "shop.example"
    assert normalise_scope("") == ""
    for bad in ("", "bob@", "bob", "a b@x.org", "@", "x@localhost", "x" * 400 + "@a.org"):
        with pytest.raises(SuppressionError):
            normalise_target(bad)


def test_lookup_keys_most_specific_first() -> None:
    assert lookup_keys("Bob@Example.org", "shop.example") == [
        b"shop.example\0bob@example.org",
        b"shop.example\0@example.org",
        b"\0bob@example.org",
        b"\0@example.org",
    ]
    assert lookup_keys("bob@example.org", "") == [b"\0bob@example.org", b"\0@example.org"]
    assert lookup_keys("not an address", "") == []


def test_the_command_round_trips_and_checks_its_entries() -> None:
    cmd = add(("bob@example.org", "", 0), ("@spam.example", "shop.example", T0 + 5))
    assert decode_entry(encode_entry([cmd])) == [cmd]
    assert invalid_item(("Bob@Example.org", "", "", "manual", 0, 0)) == "entry not normalised"
    assert invalid_item(("bob@example.org", "", "", "robot", 0, 0)) is not None


def test_add_lookup_remove(tx: Transcript, store: QueueStore) -> None:
    assert tx.one(add(("bob@example.org", "", 0), ("@blocked.example", "", 0))) == ("ok", "2")
    assert store.suppression_count() == 2
    hit = store.suppressed("BOB@example.org", "any.example", T0)
    assert hit is not None and hit.target == "bob@example.org" and hit.scope == ""
    domain = store.suppressed("anyone@blocked.example", "", T0)
    assert domain is not None and domain.target == "@blocked.example"
    assert store.suppressed("alice@example.org", "", T0) is None
    # Adding the same entry again replaces it and counts once.
    assert tx.one(add(("bob@example.org", "", 0))) == ("ok", "1")
    assert store.suppression_count() == 2
    gone = Suppress("remove", (make_entry("bob@example.org").as_command_item(),), T0)
    assert tx.one(gone) == ("ok", "1")
    assert tx.one(gone) == ("ok", "0")
    assert store.suppressed("bob@example.org", "", T0) is None
    assert store.suppression_count() == 1


def test_a_scoped_entry_applies_to_its_sender_only(tx: Transcript, store: QueueStore) -> None:
    tx.one(add(("bob@example.org", "shop.example", 0)))
    assert store.suppressed("bob@example.org", "shop.example", T0) is not None
    assert store.suppressed("bob@example.org", "SHOP.example", T0) is not None
    assert store.suppressed("bob@example.org", "news.example", T0) is None
    assert store.suppressed("bob@example.org", "", T0) is None


def test_expired_entries_count_as_absent_and_are_purged(tx: Transcript, store: QueueStore) -> None:
    tx.one(add(("bob@example.org", "", T0 + 1000), ("carol@example.org", "", 0)))
    assert store.suppressed("bob@example.org", "", T0 + 999) is not None
    assert store.suppressed("bob@example.org", "", T0 + 1000) is None
    tx.one(enqueue("Q1", at_ms=T0 + 2000))  # mail applied later purges a few
    with store.reader() as r:
        assert r.get_suppression(b"\0bob@example.org") is None
    assert store.suppression_count() == 1


def test_pages_in_key_order_with_filters(tx: Transcript, store: QueueStore) -> None:
    for start in range(0, 450, 150):
        tx.one(add(*((f"u{i:03}@example.org", "", 0) for i in range(start, start + 150))))
    tx.one(add(("u000@example.org", "shop.example", 0)))
    with store.reader() as r:
        first = r.list_suppressions(100)
        assert [e.target for e in first] == [f"u{i:03}@example.org" for i in range(100)]
        after = f"{first[-1].scope}\0{first[-1].target}"
        second = r.list_suppressions(100, after)
        assert second[0].target == "u100@example.org"
        scoped = r.list_suppressions(10, scope="shop.example")
        assert [(e.scope, e.target) for e in scoped] == [("shop.example", "u000@example.org")]
        assert r.list_suppressions(10, source="bounce") == []


def test_a_bad_command_is_rejected_whole(tx: Transcript, store: QueueStore) -> None:
    good = make_entry("bob@example.org").as_command_item()
    bad = ("Not Normalised@example.org", "", "", "manual", 0, 0)
    result = tx.one(Suppress("add", (good, bad), T0))
    assert result[0] == "rejected"
    assert store.suppression_count() == 0
    too_many = tuple([good] * (ENTRIES_PER_COMMAND + 1))
    assert tx.one(Suppress("add", too_many, T0))[0] == "rejected"
    assert tx.one(Suppress("purge", (good,), T0))[0] == "rejected"


@given(st.text(max_size=80))
def test_normalising_never_raises_anything_else(text: str) -> None:
    try:
        once = normalise_target(text)
    except SuppressionError:
        return
    assert normalise_target(once) == once
