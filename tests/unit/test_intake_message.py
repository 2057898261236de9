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


def test_a_message_that_made_too_many_hops_is_refused(store: QueueStore) -> None:
    """50 Received fields (`hopcount_limit`): a mail loop, refused as Postfix refuses it."""
    ing = SmtpIngress(
        Applies(store), ManualClock(NOW_MS), lambda n: b"\1" * n, "n1", "mx.example.org",
        ["127.0.0.0/8"], 10, lambda: 0.0,
    )  # fmt: skip
    hops = [
        b"Received: from h%d by h%d; Tue, 8 Dec 2026 00:00:00 +0000\r\n" % (i, i) for i in range(50)
    ]
    looped = b"".join(hops) + b"Subject: s\r\n\r\nbody\r\n"
    assert smtp_data(ing, looped) == "554 5.4.6 Error: too many hops"
    assert smtp_data(ing, looped.split(b"\r\n", 1)[1]).startswith("250")  # 49 of them
    assert len(store.list_messages(10)) == 1
