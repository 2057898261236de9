"""What intake changes in a message (README "SMTP replies"): checked on what is queued,
through SmtpIngress into the real state machine and LMDB store."""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils

from aiosmtpd.smtp import Session

from mqnode.clock import ManualClock
from mqnode.intake import _distinct
from mqnode.smtp.handler import DsnEnvelope, SmtpIngress
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


def test_a_recipient_named_twice_gets_one_copy(store: QueueStore) -> None:
    """As Postfix's cleanup (checked against the bench's Postfix): the same address but
    for case is one recipient; a repeat with other DSN parameters is another."""
    ing = SmtpIngress(
        Applies(store), ManualClock(NOW_MS), lambda n: b"\1" * n, "n1", "mx.example.org",
        ["127.0.0.0/8"], 10, lambda: 0.0,
    )  # fmt: skip

    async def run() -> str:
        session = Session(asyncio.get_running_loop())
        session.peer = ("127.0.0.1", 40000)
        env = DsnEnvelope()
        env.mail_from = "a@example.org"
        for i, rcpt in enumerate(
            ["b@example.net", "b@example.net", "B@example.net", "b@EXAMPLE.NET", "c@example.net"]
        ):
            assert (await ing.handle_RCPT(None, session, env, rcpt, [])).startswith("250")  # type: ignore[arg-type]
            if i == 4:
                env.add_rcpt_dsn(("SUCCESS", ""), len(env.rcpt_tos))
        env.content = env.original_content = b"Subject: s\r\n\r\nbody\r\n"
        reply: str = await ing.handle_DATA(None, session, env)  # type: ignore[arg-type]
        return reply

    assert asyncio.run(run()).startswith("250")
    (queued,) = store.list_messages(10)
    assert [r.address for r in queued.recipients] == ["b@example.net", "c@example.net"]


def test_distinct_keeps_repeats_with_other_dsn_parameters() -> None:
    rcpts = ("b@x.test", "B@X.TEST", "b@x.test", "c@x.test")
    dsn = {"dsn_ret": "HDRS", "dsn_notify": ("NEVER", "NEVER", "SUCCESS", ""), "dsn_orcpt": ()}
    got, got_dsn = _distinct(rcpts, dsn)
    assert got == ("b@x.test", "b@x.test", "c@x.test")
    assert got_dsn == {**dsn, "dsn_notify": ("NEVER", "SUCCESS", "")}
    assert _distinct(("a@x.test",), {}) == (("a@x.test",), {})
