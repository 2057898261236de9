"""RFC 3464 bounces: structure, returned content, determinism, injection, line limits."""

from __future__ import annotations

import email
import email.parser
import email.policy
import re
import tracemalloc
from dataclasses import replace
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqnode.dsn.report import (
    MAX_DIAGNOSTIC_CHARS,
    FailedRecipient,
    build_dsn,
    is_null_sender,
    status_from_reply,
)

ORIGINAL = (
    b"Received: from client.a.org ([192.0.2.1]) by mx1.example.org\r\n"
    b"Message-ID: <m1@a.org>\r\n"
    b"From: Alice <alice@a.org>\r\n"
    b"To: bob@x.org, carol@y.org\r\n"
    b"Subject: lunch\r\n"
    b"\r\n"
    b"See you at noon.\r\n"
)
BOB = FailedRecipient(
    "bob@x.org", "5.1.1", "550 5.1.1 <bob@x.org>: Recipient address rejected", "mx.x.org"
)
CAROL = FailedRecipient("carol@y.org", "4.4.7", "451 4.3.0 try again later", "mx.y.org")
NOW_MS = 1_700_000_500_000
ARRIVAL_MS = 1_700_000_000_000


def build(**overrides: Any) -> bytes:
    args: dict[str, Any] = dict(
        queue_id="0ABCDEFGH1234",
        reporting_mta="mx1.example.org",
        original_sender="alice@a.org",
        original_message_id="<m1@a.org>",
        arrival_ms=ARRIVAL_MS,
        now_ms=NOW_MS,
        failed=[BOB, CAROL],
        original=ORIGINAL,
    )
    args.update(overrides)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts_of(msg: EmailMessage) -> list[EmailMessage]:
    """The report's three parts; an SMTPUTF8 report is of RFC 6533's global type."""
    assert msg.get_content_type() == "multipart/report"
    status_type = msg.get_param("report-type")
    assert status_type in ("delivery-status", "global-delivery-status")
    parts = list(msg.iter_parts())
    assert len(parts) == 3
    assert isinstance(parts[0], EmailMessage)
    assert parts[1].get_content_type() == f"message/{status_type}"
    return [p for p in parts if isinstance(p, EmailMessage)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    part = parts_of(msg)[1]
    if part.get_content_type() == "message/global-delivery-status":
        # The email package parses only message/delivery-status into header blocks: read
        # the part's body as written.
        text = re.split(rb"\r?\n\r?\n", part.as_bytes(), maxsplit=1)[1]
        chunks = re.split(rb"\r?\n\r?\n", text.strip())
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        return [parser.parsebytes(c + b"\r\n\r\n") for c in chunks]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()  # the email package gives a list of header blocks
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def raw_field(block: Message, name: str) -> str | None:
    """A field's value as written, unfolded (no encoded-word decoding)."""
    for key, value in block.raw_items():
        if key.lower() == name.lower():
            return re.sub(r"\r?\n", "", str(value))
    return None


def assert_wire_clean(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


# -- structure ------------------------------------------------------------------------------


def test_top_level_headers() -> None:
    msg = parse(build())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx1.example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@a.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW_MS // 1000
    assert re.fullmatch(r"<0ABCDEFGH1234\.[0-9a-f]+\.dsn@mx1\.example\.org>", msg["Message-ID"])
    assert msg["In-Reply-To"] == "<m1@a.org>"
    assert msg["MIME-Version"] == "1.0"
    assert not msg.defects


def test_three_parts_in_order() -> None:
    text, status, returned = parts_of(parse(build()))
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/rfc822"
    body = text.get_content()
    assert "mx1.example.org" in body
    assert "<bob@x.org>: host mx.x.org said: 550 5.1.1" in body
    assert "<carol@y.org>: the message expired" in body


def test_delivery_status_fields() -> None:
    per_message, bob, carol = status_blocks(parse(build()))
    assert per_message["Reporting-MTA"] == "dns; mx1.example.org"
    assert per_message["X-Mqnode-Queue-ID"] == "0ABCDEFGH1234"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL_MS // 1000
    assert bob["Final-Recipient"] == "rfc822; bob@x.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.x.org"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@x.org>: Recipient address rejected"
    assert "Original-Recipient" not in bob
    assert carol["Final-Recipient"] == "rfc822; carol@y.org"
    assert carol["Status"] == "4.4.7"


def test_optional_fields() -> None:
    dns_failure = FailedRecipient("d@nx.example", "5.1.2", "", "", original_recipient="<D@nx>")
    _, block = status_blocks(parse(build(failed=[dns_failure])))
    assert block["Original-Recipient"] == "rfc822; D@nx"
    assert "Remote-MTA" not in block
    assert "Diagnostic-Code" not in block
    assert [k for k, _ in block.raw_items()][:2] == ["Original-Recipient", "Final-Recipient"]


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    rcpt = FailedRecipient("jörg+x@bücher.example", "5.1.1", "550 nö", "mx.example")
    raw = build(failed=[rcpt], original_sender="zoë@a.org")
    _, block = status_blocks(parse(raw))
    assert raw_field(block, "Final-Recipient") == r"utf-8; j\x{F6}rg\x{2B}x@b\x{FC}cher.example"
    assert raw_field(block, "Diagnostic-Code") == r"smtp; 550 n\x{F6}"
    assert "zoë@a.org" in parse(raw)["To"]
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"  # RFC 6533
    part = parts_of(msg)[1]
    assert part.get_content_type() == "message/global-delivery-status"
    assert part.as_bytes().isascii()  # the utf-8 address type in its xtext form
    assert parts_of(msg)[2].get_content_type() == "message/global"


def test_an_ascii_message_keeps_the_rfc3464_types() -> None:
    msg = parse(build())
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts_of(msg)][1:] == [
        "message/delivery-status",
        "message/rfc822",
    ]


RELAYED = FailedRecipient(
    "dave@z.org", "2.0.0", "250 2.0.0 Ok: queued as 77", "relay.example", action="relayed"
)


def test_a_success_report_says_so_and_returns_headers_only() -> None:
    msg = parse(build(failed=[RELAYED], headers_only=True))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    text, _, returned = parts_of(msg)
    body = text.get_content()
    assert "successfully delivered" in body and "could not be delivered" not in body
    assert "<dave@z.org>: delivery via relay.example: 250 2.0.0 Ok" in body
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"See you at noon." not in build(failed=[RELAYED], headers_only=True)
    _, block = status_blocks(msg)
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")


def test_a_mixed_report_names_both() -> None:
    msg = parse(build(failed=[BOB, RELAYED]))
    assert msg["Subject"] == "Mail Delivery Status Report"
    body = parts_of(msg)[0].get_content()
    assert "could not be delivered" in body and "successfully delivered" in body


def test_envelope_id_is_the_first_per_message_field_in_xtext() -> None:
    per_message, *_ = status_blocks(parse(build(envelope_id="T-42 +x\r\nBcc: e@v.il")))
    assert next(k for k, _ in per_message.raw_items()) == "Original-Envelope-Id"
    assert per_message["Original-Envelope-Id"] == "T-42+20+2Bx+0D+0ABcc:+20e@v.il"
    first, *_ = status_blocks(parse(build()))
    assert "Original-Envelope-Id" not in first


def test_ret_hdrs_returns_the_header_block_of_a_small_original() -> None:
    _, _, returned = parts_of(parse(build(headers_only=True)))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_content().rstrip().endswith("Subject: lunch")


# -- the returned original ------------------------------------------------------------------


def test_small_original_is_returned_whole_byte_for_byte() -> None:
    raw = build()
    assert ORIGINAL.rstrip(b"\r\n") in raw
    inner = parts_of(parse(raw))[2].get_content()
    assert inner["Subject"] == "lunch"
    assert inner["Message-ID"] == "<m1@a.org>"
    assert "See you at noon." in inner.get_content()


def test_large_original_returns_headers_only() -> None:
    big = ORIGINAL + b"x" * 80 + b"\r\n" * 2000
    raw = build(original=big, max_returned_bytes=4096)
    returned = parts_of(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_content()
    assert "Subject: lunch" in headers
    assert "Message-ID: <m1@a.org>" in headers
    assert "See you at noon." not in headers
    assert b"See you at noon." not in raw
    assert "returned message's headers" in parts_of(parse(raw))[0].get_content()


def test_a_big_original_of_short_lines_costs_no_list_of_its_lines() -> None:
    # 16 MB in 4-byte lines: splitting it whole made ~4 million line objects (~10x it)
    big = ORIGINAL + b"ab\r\n" * (4 * 1024 * 1024)
    tracemalloc.start()
    try:
        raw = build(original=big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parts_of(parse(raw))[2].get_content_type() == "text/rfc822-headers"
    assert peak < 4 * 1024 * 1024, peak


def test_oversized_header_block_keeps_whole_fields() -> None:
    folded = b"X-Long: " + b"word " * 30 + b"\r\n\tmore\r\n"
    original = b"Subject: s\r\n" + folded * 50 + b"\r\nbody\r\n"
    returned = parts_of(parse(build(original=original, max_returned_bytes=1000)))[2]
    block = returned.get_payload(decode=True)
    assert isinstance(block, bytes)
    assert block.startswith(b"Subject: s\r\n") and len(block) <= 1000
    assert block.endswith(b"\tmore")  # no field cut in half


def test_lf_only_original_is_sent_with_crlf() -> None:
    raw = build(original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert_wire_clean(raw)
    assert ORIGINAL.rstrip(b"\r\n") in raw


def test_eight_bit_headers_survive_in_a_returned_message() -> None:
    original = b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\n\r\nbody\r\n"
    raw = build(original=original)
    assert b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\n" in raw
    returned = parts_of(parse(raw))[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"
    assert "Content-Transfer-Encoding" not in parse(build())  # all-ASCII report: 7bit
    assert returned.get_content()["Subject"] == "café"


def test_eight_bit_headers_survive_headers_only() -> None:
    original = b"Subject: caf\xc3\xa9\r\nFrom: a@b\r\n\r\n" + b"y" * 500
    raw = build(original=original, max_returned_bytes=100)
    msg = parse(raw)
    returned = parts_of(msg)[2]
    # UTF-8 header fields: an SMTPUTF8 message, returned as RFC 6533 message/global-headers
    assert msg.get_param("report-type") == "global-delivery-status"
    assert returned.get_content_type() == "message/global-headers"
    assert b"8bit\r\n\r\nSubject: caf\xc3\xa9\r\nFrom: a@b\r\n--" in raw
    whole = parts_of(parse(build(original=original)))[2]
    assert whole.get_content_type() == "message/global"

    latin1 = b"Subject: caf\xe9\r\n\r\n" + b"y" * 500
    returned = parts_of(parse(build(original=latin1, max_returned_bytes=100)))[2]
    assert returned.get_param("charset") is None  # not UTF-8: bytes kept, no false label
    assert returned.get_payload(decode=True) == b"Subject: caf\xe9"


def test_unsafe_header_block_is_base64() -> None:
    original = b"Subject: s\r\nX-Huge: " + b"z" * 2000 + b"\r\n\r\nbody\r\n"
    raw = build(original=original)
    assert_wire_clean(raw)
    returned = parts_of(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "base64"
    assert returned.get_payload(decode=True) == original.split(b"\r\n\r\n")[0]


# -- determinism and identity ---------------------------------------------------------------


def test_same_inputs_same_bytes() -> None:
    assert build() == build()


def test_message_id_follows_the_failure_not_the_clock() -> None:
    first, later = parse(build()), parse(build(now_ms=NOW_MS + 60_000))
    assert first["Message-ID"] == later["Message-ID"]
    assert first["Date"] != later["Date"]
    other = parse(build(failed=[CAROL]))
    assert other["Message-ID"] != first["Message-ID"]


def test_original_containing_the_boundary_cannot_break_the_report() -> None:
    boundary = parse(build()).get_boundary()
    assert boundary is not None
    hostile = ORIGINAL + f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nfake\r\n".encode()
    msg = parse(build(original=hostile))
    assert msg.get_boundary() != boundary
    assert len(parts_of(msg)) == 3


# -- injection and limits -------------------------------------------------------------------

INJECTIONS = ["\r\nBcc: evil@z.org", "\nBcc: evil@z.org", "\rBcc: evil@z.org", "\u2028Bcc: e@z"]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_cr_lf_in_inputs_adds_no_header(payload: str) -> None:
    rcpt = FailedRecipient(
        "bob@x.org" + payload, "5.1.1", "550 no" + payload + "\r\n\r\nbody", "mx" + payload
    )
    raw = build(
        failed=[rcpt],
        original_sender="alice@a.org" + payload,
        original_message_id="<m1@a.org>" + payload,
        reporting_mta="mx1.example.org" + payload,
        queue_id="Q1" + payload,
    )
    assert_wire_clean(raw)
    assert not re.search(rb"(?im)^bcc:", raw)
    msg = parse(raw)
    assert "Bcc" not in msg
    for block in status_blocks(msg):
        assert "Bcc" not in block
    assert len(status_blocks(msg)) == 2


def test_lone_surrogates_and_nul_are_cleaned() -> None:
    rcpt = FailedRecipient("bob@x.org", "5.0.0", "550 a\udcffb\x00c", "")
    raw = build(failed=[rcpt])
    _, block = status_blocks(parse(raw))
    assert block["Diagnostic-Code"] == "smtp; 550 a b c"


def test_long_diagnostic_is_folded_and_capped() -> None:
    words = "550 " + " ".join(["rejected"] * 400)
    unbroken = "550 " + "x" * 5000
    raw = build(
        failed=[FailedRecipient("a@x", "5.0.0", words, "mx"), replace(BOB, diagnostic=unbroken)]
    )
    assert_wire_clean(raw)
    _, folded, capped = status_blocks(parse(raw))
    assert folded["Diagnostic-Code"] == "smtp; " + words[:MAX_DIAGNOSTIC_CHARS].rstrip()
    header_lines = [line for line in raw.split(b"\r\n") if line.startswith(b" rejected")]
    assert header_lines and max(len(line) for line in header_lines) <= 78
    code = raw_field(capped, "Diagnostic-Code")
    assert code is not None and len(code) < MAX_DIAGNOSTIC_CHARS + 20


# -- validation, status codes, null sender --------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"original_sender": ""},
        {"original_sender": "<>"},
        {"failed": []},
        {"failed": [FailedRecipient("a@x", "5.1", "", "")]},
        {"failed": [FailedRecipient("a@x", "6.0.0", "", "")]},
        {"failed": [FailedRecipient("a@x", "5.0.0", "", "", action="bounced")]},
        {"queue_id": ""},
        {"reporting_mta": "\r\n"},
    ],
)
def test_bad_arguments_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(**overrides)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.1.1 user unknown", "5.1.1"),
        ("550-5.1.1 user unknown\r\n550 5.1.1 more", "5.1.1"),
        ("550 user unknown", "5.0.0"),
        ("451 try later", "4.0.0"),
        ("452 4.2.2 mailbox full", "4.2.2"),
        ("554 5.7.1", "5.7.1"),
        ("550", "5.0.0"),
        ("550 4.1.1 class mismatch", "5.0.0"),
        ("451 5.7.1 class mismatch", "4.0.0"),
        ("550 5.01.001 leading zeros", "5.1.1"),
        ("550 5.1.1000 too long", "5.0.0"),
        ("250 2.0.0 ok", "2.0.0"),
        ("  550 5.1.1 leading space", "5.1.1"),
        ("354 go ahead", "X"),
        ("150 odd", "X"),
        ("5501 x", "X"),
        ("590 bad second digit", "X"),
        ("hello", "X"),
        ("", "X"),
        ("55", "X"),
    ],
)
def test_status_from_reply(reply: str, expected: str) -> None:
    assert status_from_reply(reply, "X") == expected


@pytest.mark.parametrize(
    ("addr", "null"),
    [("", True), ("<>", True), (" <> ", True), ("< >", True), ("a@b", False), ("<a@b>", False)],
)
def test_is_null_sender(addr: str, null: bool) -> None:
    assert is_null_sender(addr) is null


# -- property -------------------------------------------------------------------------------

_ADDR_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs"), blacklist_characters="<>@"
)
_ADDRS = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(_ADDR_CHARS, min_size=1, max_size=16),
    st.text(_ADDR_CHARS, min_size=1, max_size=16),
)
_NASTY = st.lists(
    st.one_of(st.characters(), st.sampled_from(["\r", "\n", "\r\n", "\u2028", "X-Evil: 1"])),
    max_size=40,
).map("".join)
_RCPTS = st.builds(
    FailedRecipient,
    address=_ADDRS,
    status=st.sampled_from(["5.0.0", "5.1.1", "4.4.7", "5.7.1"]),
    diagnostic=_NASTY,
    remote_mta=_NASTY,
)
_RCPT_FIELDS = {"Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code"}


def _decode_address(field: str) -> str:
    kind, _, value = field.partition("; ")
    if kind == "rfc822":
        return value
    assert kind == "utf-8"
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), value)


@settings(max_examples=60, deadline=None)
@given(
    failed=st.lists(_RCPTS, min_size=1, max_size=4),
    sender=_ADDRS,
    queue_id=st.text(st.sampled_from("0123456789ABCDEFGHJKMNPQRSTV"), min_size=1, max_size=16),
    original=st.binary(max_size=400),
    max_returned=st.integers(0, 500),
    msgid=_NASTY,
)
def test_any_inputs_give_a_parseable_report(
    failed: list[FailedRecipient],
    sender: str,
    queue_id: str,
    original: bytes,
    max_returned: int,
    msgid: str,
) -> None:
    raw = build(
        failed=failed,
        original_sender=sender,
        queue_id=queue_id,
        original=original,
        max_returned_bytes=max_returned,
        original_message_id=msgid,
    )
    assert_wire_clean(raw)
    msg = parse(raw)
    top = {k for k, _ in msg.raw_items()}
    assert top <= {
        "From", "To", "Subject", "Auto-Submitted", "Date", "Message-ID", "In-Reply-To",
        "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    }  # fmt: skip
    text = parts_of(msg)[0].get_content()
    blocks = status_blocks(msg)
    assert len(blocks) == len(failed) + 1
    for rcpt, block in zip(failed, blocks[1:], strict=True):
        final = raw_field(block, "Final-Recipient")
        assert final is not None and _decode_address(final) == rcpt.address
        assert block["Status"] == rcpt.status
        assert block["Action"] == "failed"
        assert {k for k, _ in block.raw_items()} <= _RCPT_FIELDS
        assert f"<{rcpt.address}>" in text
