"""What intake changes in a message (README "SMTP replies"): checked on what is queued,
through SmtpIngress into the real state machine and LMDB store."""

from __future__ import annotations

import email
import email.policy
import email.utils

from mqnode.clock import ManualClock
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.store import QueueStore

from .kit import Applies, smtp_data

NOW_MS = 1_800_000_000_000


def _queued(store: QueueStore, *messages: bytes) -> list[bytes]:
    ids = iter(range(1, 100))
    ing = SmtpIngress(
        Applies(store), ManualClock(NOW_MS), lambda n: bytes([next(ids)]) * n, "n1",
        "mx.example.org", ["127.0.0.0/8"], 10, lambda: 0.0,
    )  # fmt: skip
    for message in messages:
        reply = smtp_data(ing, message)
        assert reply.startswith("250"), reply
    queued = sorted(store.list_messages(100), key=lambda m: m.queue_id)
    return [store.read_body(m) for m in queued]


def test_a_date_is_added_where_there_is_none(store: QueueStore) -> None:
    without, with_one = _queued(
        store,
        b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n",
        b"From: a@example.org\r\nDate: Fri, 01 Jan 2027 00:00:00 +0000\r\n\r\nbody\r\n",
    )
    added = email.message_from_bytes(without, policy=email.policy.default)
    assert email.utils.parsedate_to_datetime(added["Date"]).timestamp() * 1000 == NOW_MS
    kept = email.message_from_bytes(with_one, policy=email.policy.default)
    assert kept.get_all("Date") == ["Fri, 01 Jan 2027 00:00:00 +0000"]
    assert added["Message-ID"] and kept["Message-ID"]


def test_bcc_and_a_missing_empty_line(store: QueueStore) -> None:
    (queued,) = _queued(
        store, b"From: a@example.org\r\nBcc: hidden@example.net\r\nSubject: s\r\nbody line\r\n"
    )
    head, body = queued.split(b"\r\n\r\n", 1)
    assert b"hidden@" not in head and body == b"body line\r\n"
