"""notify.report_for: which outcomes the sender hears of (RFC 3461 NOTIFY), and how."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from pathlib import Path

import dkim

from mqnode.dsn.notify import report_for
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.signing.keys import ED25519, KeySet, keygen
from mqnode.spool.dsnparams import DsnRequest
from mqnode.spool.model import Outcome, QueuedMessage

from .kit import queued_message

BODY = b"Message-ID: <m@a.org>\r\nSubject: hi\r\n\r\nthe body\r\n"
OK = Outcome.DELIVERED.value
BOUNCED = Outcome.BOUNCED.value
DEFERRED = Outcome.DEFERRED.value


def message(dsn: DsnRequest | None = None, sender: str = "alice@a.org") -> QueuedMessage:
    return queued_message(
        "0ABC",
        tuple(f"r{i}@x.org" for i in range(4)),
        received_ms=1_700_000_000_000,
        mail_from=sender,
        size=len(BODY),
        message_id="<m@a.org>",
        extra={"dsn": dsn.to_record()} if dsn else {},
    )


def report(
    msg: QueuedMessage, results: list[tuple[int, str, str]], passed: frozenset[int] = frozenset()
) -> EmailMessage | None:
    raw = report_for(
        msg,
        results,
        {0: "mx", 1: "mx", 2: "mx", 3: "mx"},
        BODY,
        1_700_000_100_000,
        "me.example",
        "0DSN",
        passed,
    )
    if not raw:
        return None
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def blocks(msg: EmailMessage) -> list[Message]:
    part = list(msg.iter_parts())[1].get_payload()
    assert isinstance(part, list)
    return part[1:]


def test_without_dsn_parameters_only_bounces_are_reported_as_before() -> None:
    msg = message()
    assert report(msg, [(0, OK, "250 ok"), (1, DEFERRED, "451 later")]) is None
    got = report(msg, [(0, OK, "250 ok"), (1, BOUNCED, "550 5.1.1 no")])
    assert got is not None and [b["Final-Recipient"] for b in blocks(got)] == ["rfc822; r1@x.org"]
    assert list(got.iter_parts())[2].get_content_type() == "message/rfc822"


def test_notify_never_and_success_only_silence_a_bounce() -> None:
    msg = message(DsnRequest(notify=("NEVER", "SUCCESS", "DELAY", "")))
    bounced = [(i, BOUNCED, "550 5.1.1 no") for i in range(4)]
    got = report(msg, bounced)
    assert got is not None and [b["Final-Recipient"] for b in blocks(got)] == ["rfc822; r3@x.org"]


def test_notify_success_is_reported_as_relayed_unless_the_host_took_the_request() -> None:
    msg = message(
        DsnRequest(
            envid="E1",
            notify=("SUCCESS", "SUCCESS", "", "NEVER"),
            orcpt=("rfc822;Old@x.org", "", "", ""),
        )
    )
    delivered = [(i, OK, "250 2.0.0 queued") for i in range(4)]
    got = report(msg, delivered, passed=frozenset({1}))
    assert got is not None and got["Subject"] == "Successful Mail Delivery Report"
    (only,) = blocks(got)
    assert only["Action"] == "relayed" and only["Status"] == "2.0.0"
    assert only["Original-Recipient"] == "rfc822; Old@x.org"
    assert only["Final-Recipient"] == "rfc822; r0@x.org"
    per_message = list(got.iter_parts())[1].get_payload()[0]
    assert per_message["Original-Envelope-Id"] == "E1"
    assert list(got.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert report(msg, delivered, passed=frozenset({0, 1})) is None


def test_ret_hdrs_returns_headers_with_a_failure() -> None:
    got = report(message(DsnRequest(ret="HDRS")), [(0, BOUNCED, "550 no")])
    assert got is not None
    assert list(got.iter_parts())[2].get_content_type() == "text/rfc822-headers"


def test_the_null_sender_hears_nothing() -> None:
    msg = message(DsnRequest(notify=("SUCCESS,FAILURE",) * 4), sender="")
    assert report(msg, [(0, OK, "250"), (1, BOUNCED, "550")]) is None


def test_queue_show_includes_the_request_only_when_there_is_one() -> None:
    req = DsnRequest("HDRS", "E1", ("NEVER", "", "", ""), ())
    assert message(req).summary()["dsn"] == req.to_record()
    assert "dsn" not in message().summary()


def test_a_report_is_signed_for_the_reporting_domain_when_a_key_signs_for_it(
    tmp_path: Path,
) -> None:
    key = keygen("me.example", "s1", ED25519, 0, tmp_path)
    signer = DkimSigner(KeySet([key]))
    raw = report_for(
        message(),
        [(0, BOUNCED, "550 5.1.1 no such user")],
        {},
        BODY,
        1_700_000_100_000,
        "me.example",
        "0DSN",
        sign=signer.sign_report,
    )
    assert raw.startswith(b"DKIM-Signature: ") and b"d=me.example;" in raw

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name.rstrip(b".") == key.record_name.encode()
        return key.txt_record().encode()

    assert dkim.DKIM(raw).verify(dnsfunc=dnsfunc)
    # no key for the reporting domain: the report goes as it was
    other = report_for(
        message(),
        [(0, BOUNCED, "550")],
        {},
        BODY,
        1,
        "other.example",
        "0DSN",
        sign=signer.sign_report,
    )
    assert other and not other.startswith(b"DKIM-Signature")
