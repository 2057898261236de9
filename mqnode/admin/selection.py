"""Which messages a queue command means (`--state`, `--domain`, `--sender`), at any queue size.

A selection reads the state in pages of `PAGE` entries, each in a read of its
own: the store's lock, which the apply thread takes too, is held for one page,
never for a whole queue of a million messages. The admin endpoint runs it off
the event loop. With a domain it reads that domain's part of the per-domain
index (time bounded by the domain's mail, not the queue's); otherwise the
messages in queue id order. A message is decoded only when a state or sender
filter needs it.

A selection is as of the moment each page is read: mail queued meanwhile may
or may not be in it, and a message whose due time another command moves
behind the read position at the same time (a retry or release) may be missed;
running the command again finds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mqnode.spool.model import MessageState, QueuedMessage
from mqnode.spool.store import QueueStore

PAGE = 5000


@dataclass(frozen=True)
class Filter:
    state: MessageState | None = None
    domain: str = ""
    sender: str | None = None  # lowercased, without <>; "" is the null sender (bounces)

    @classmethod
    def parse(cls, state: Any, domain: Any, sender: Any) -> Filter:
        """From a request's fields; ValueError for anything but strings or a known state."""
        if not all(isinstance(v, str | None) for v in (state, domain, sender)):
            raise ValueError("state, domain and sender must be strings")
        return cls(
            MessageState(state) if state else None,
            domain or "",
            None if sender is None else sender.strip("<>").lower(),
        )

    @property
    def decodes(self) -> bool:
        return self.state is not None or self.sender is not None

    def matches(self, msg: QueuedMessage) -> bool:
        if self.state is not None and msg.state() is not self.state:
            return False
        return self.sender is None or msg.mail_from.lower() == self.sender


def _id_pages(store: QueueStore, f: Filter) -> Iterator[list[str]]:
    if f.domain:
        after = b""
        while True:
            ids, after = store.domain_id_page(f.domain, after, PAGE)
            yield ids
            if not after:
                return
    else:
        last = ""
        while True:
            ids = store.id_page(last, PAGE)
            yield ids
            if len(ids) < PAGE:
                return
            last = ids[-1]


def select_messages(store: QueueStore, f: Filter, limit: int) -> list[QueuedMessage]:
    """Up to `limit` matching messages, decoded (a listing)."""
    return list(_matches(store, f, limit))


def select_ids(store: QueueStore, f: Filter) -> list[str]:
    """Every matching message's id (an operation on them all)."""
    if f.decodes:
        return [m.queue_id for m in _matches(store, f, None)]
    if not f.domain:  # queue id order: no id comes twice
        return [i for ids in _id_pages(store, f) for i in ids]
    found: dict[str, None] = {}  # ordered, and a message met twice counts once
    for ids in _id_pages(store, f):
        found.update(dict.fromkeys(ids))
    return list(found)


def _matches(store: QueueStore, f: Filter, limit: int | None) -> Iterator[QueuedMessage]:
    """Matching messages, page by page. With a state, the reading stops once as many
    messages in that state were met as the state's counter held at the start: listing
    the held mail of a million-message queue holding none reads nothing."""
    left = None if f.state is None else store.counts()[f.state.value]
    taken = 0
    # In a domain's index a message whose due time moved may come round again; in queue
    # id order none does, and a full read keeps no set of a million ids.
    seen: set[str] | None = set() if f.domain else None
    for ids in _id_pages(store, f):
        if left is not None and left <= 0:
            return
        fresh = ids
        if seen is not None:
            fresh = [i for i in ids if i not in seen]
            seen.update(fresh)
        if not f.decodes and limit is not None:
            fresh = fresh[: limit - taken]
        for msg in store.messages(fresh):
            if f.state is not None and msg.state() is f.state:
                left = (left or 0) - 1
            if f.matches(msg):
                yield msg
                taken += 1
                if limit is not None and taken >= limit:
                    return
