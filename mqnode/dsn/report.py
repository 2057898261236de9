"""dsn: RFC 3464 delivery status notifications (bounces and success reports).

`build_dsn()` renders the report for one queued message as a
`multipart/report; report-type=delivery-status` message (RFC 6522), ready to
be enqueued through the log like any other message and sent with the null
return path. `is_null_sender()` is how the dispatcher makes sure a bounce
never bounces; `build_dsn()` refuses a null sender too.

Shape (the order is the RFC's):
    headers      From: Mail Delivery System <MAILER-DAEMON@reporting_mta>,
                 To: <original_sender>, Subject (by the actions reported:
                 failures, successes or both), Auto-Submitted: auto-replied
                 (RFC 3834), Date, Message-ID, In-Reply-To/References (when the
                 original had a Message-ID), MIME-Version, Content-Type.
    part 1       text/plain: a short Postfix-like explanation, one paragraph
                 per reported recipient naming the host and its reply.
    part 2       message/delivery-status: [Original-Envelope-Id], Reporting-MTA,
                 X-Mqnode-Queue-ID, X-Mqnode-Sender, Arrival-Date; then per recipient
                 [Original-Recipient], Final-Recipient, Action, Status,
                 [Remote-MTA], [Diagnostic-Code].
    part 3       message/rfc822 with the whole original when it is at most
                 `max_returned_bytes`, every line fits in 998 octets and
                 `headers_only` is false (RET=HDRS, or a report of successes
                 only); otherwise text/rfc822-headers with its header block only
                 (whole fields kept while they fit in `max_returned_bytes`).

Determinism: the output is a pure function of the arguments. Date comes from
`now_ms`, Arrival-Date from `arrival_ms` (both shown in UTC); the
Message-ID is `<queue id . digest of the failed addresses . dsn @ host>`, so a
rebuilt bounce for the same failures keeps its id (receivers can de-duplicate)
while a later bounce for other recipients of the same message gets a new one;
the MIME boundary is the queue id plus a digest of every input, so no input can
contain it (this is checked, not assumed).

SMTPUTF8 (RFC 6533): a report about a message with a UTF-8 address (sender or a
reported recipient) or UTF-8 header fields is a `global-delivery-status` report:
part 2 is message/global-delivery-status, part 3 message/global (or
message/global-headers for the header block).

Safety: every input string is cleaned before use: control characters (CR, LF,
TAB, NUL ...), Unicode line and paragraph separators and lone surrogates
become spaces, so no input can start a header line or a MIME part. Header
fields are folded here, at spaces, to 78 columns where possible and never past
998 octets (an unbreakable word longer than that is split, which adds a space
when unfolded). Delivery-status fields are ASCII as RFC 3464 requires: non-ASCII
text is written as RFC 6533 `\\x{HEX}` escapes and a non-ASCII address uses the
`utf-8;` address type. The top-level To header keeps a UTF-8 sender as is
(RFC 6532; such a bounce needs SMTPUTF8 anyway).

The returned original is spliced in as bytes after rendering, so it goes out
byte for byte apart from line endings (normalised to CRLF): 8-bit headers
survive, declared `Content-Transfer-Encoding: 8bit`. A header block that is not
8bit-safe (a NUL or a line over 998 octets) is returned base64-encoded.

Limits: `max_returned_bytes` (default 64 KiB) bounds the returned content;
a Diagnostic-Code is cut to MAX_DIAGNOSTIC_CHARS characters. Times must lie in
datetime's range (years 1..9999).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import textwrap
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.utils import format_datetime
from typing import Any

from mqnode.spool.dsnparams import xtext_encode

MAX_DIAGNOSTIC_CHARS = 1000
LINE_MAX_OCTETS = 998  # RFC 5322 section 2.1.1
_FOLD_COLUMNS = 78
_TEXT_COLUMNS = 76
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_BASIC_RE = re.compile(r"([2-5])[0-5][0-9](?:[ -]|$)")
_ENHANCED_RE = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:\s|$)")
_MSGID_RE = re.compile(r"<[^<>\s]+@[^<>\s]+>")
# Raw header values pass through unchanged when no line exceeds max_line_length;
# utf8=True only matters for a UTF-8 To header (everything else is ASCII). Typed Any:
# the stubs tie EmailPolicy to EmailMessage, but the generator renders any Message.
_POLICY: email_policy.Policy[Any] = email_policy.SMTPUTF8.clone(max_line_length=LINE_MAX_OCTETS)
_SUCCESS_TEXT = (  # Postfix's words for a success report
    "Your message was successfully delivered to the destination(s) listed below. If the "
    "message was delivered to mailbox you will receive no further notifications. Otherwise "
    "you may still receive notifications of mail delivery errors from other systems."
)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient to report. `status` is an enhanced code ("5.1.1", "4.4.7")."""

    address: str  # the envelope recipient
    status: str
    diagnostic: str  # the remote reply, e.g. "550 5.1.1 <bob@x.org>: user unknown"; may be ""
    remote_mta: str  # the host that answered; "" if none (e.g. a DNS failure)
    action: str = "failed"
    original_recipient: str = ""  # the ORCPT address, when known


def is_null_sender(addr: str) -> bool:
    """True for the empty reverse path ("" or "<>"): mail that must never be bounced."""
    stripped = addr.strip()
    if stripped.startswith("<") and stripped.endswith(">"):
        stripped = stripped[1:-1].strip()
    return stripped == ""


def status_from_reply(reply: str, default: str) -> str:
    """The enhanced status of an SMTP reply, or `default` when it has no usable code.

    "550 5.1.1 user unknown" -> "5.1.1"; "550 user unknown" -> "5.0.0";
    "451 try later" -> "4.0.0". An enhanced code counts only when its class
    matches the first digit of the basic code; 1xx/3xx and garbage give `default`.
    """
    text = reply.lstrip()
    basic = _BASIC_RE.match(text)
    if basic is None:
        return default
    klass = basic.group(1)
    if klass == "3":
        return default
    enhanced = _ENHANCED_RE.match(text[4:])
    if enhanced is not None and enhanced.group(1) == klass:
        return f"{klass}.{int(enhanced.group(2))}.{int(enhanced.group(3))}"
    return f"{klass}.0.0"


def build_dsn(
    *,
    queue_id: str,
    reporting_mta: str,
    original_sender: str,
    original_message_id: str,
    arrival_ms: int,
    now_ms: int,
    failed: list[FailedRecipient],
    original: bytes,
    max_returned_bytes: int = 64 * 1024,
    envelope_id: str = "",
    headers_only: bool = False,
) -> bytes:
    """Render the report (CRLF line endings) of `original` for the `failed` recipients
    (the name is historical: each has its own action, "failed" or e.g. "relayed").

    Raises ValueError for a null sender, an empty recipient list, an empty
    queue id or host, or a recipient whose action or status is malformed.
    """
    if is_null_sender(original_sender):
        raise ValueError("no DSN for the null sender")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    for rcpt in failed:
        if rcpt.action not in _ACTIONS:
            raise ValueError(f"bad DSN action {rcpt.action!r}")
        if _STATUS_RE.fullmatch(rcpt.status) is None:
            raise ValueError(f"bad DSN status {rcpt.status!r}")
    host = _token(reporting_mta, "-.")
    qid = _token(queue_id, "")[:40]
    if not host or not qid:
        raise ValueError("queue_id and reporting_mta must not be empty")
    sender = _address(original_sender)
    utf8 = _is_global(original_sender, failed, original)
    returned_type, returned_cte, returned = _returned_part(
        original, max_returned_bytes, headers_only, utf8
    )
    inputs: list[str | bytes | int] = [queue_id, reporting_mta, original_sender]
    inputs += [original_message_id, arrival_ms, now_ms, max_returned_bytes, original]
    inputs += [envelope_id, int(headers_only)]
    for r in failed:
        inputs += [r.address, r.status, r.diagnostic, r.remote_mta, r.action, r.original_recipient]
    text = _human_text(host, failed, returned_type)
    ds_blocks = _status_blocks(queue_id, host, sender, arrival_ms, failed, envelope_id)
    own_id = f"<{qid}.{_digest(sorted(_address(r.address) for r in failed))[:12]}.dsn@{host}>"
    for salt in range(8):
        digest = _digest([salt, *inputs])
        boundary = f"=_{qid}.{digest[:24]}"
        placeholder = f"=_{digest}_returned"
        top = Message(policy=email_policy.compat32)
        _headers(top, host, sender, original_message_id, now_ms, own_id, _subject(failed))
        status, status_body = _status_part(ds_blocks), b""
        if utf8:
            # The email package renders header blocks for message/delivery-status only:
            # the same blocks go in RFC 6533's global type, spliced in like the original.
            status_body = _render(status).split(b"\r\n\r\n", 1)[1]
            status = _leaf("message/global-delivery-status", "7bit", f"=_{digest}_status")
        parts: list[Message | str] = [_text_part(text), status]
        parts.append(_leaf(returned_type, returned_cte, placeholder))
        report = "global-delivery-status" if utf8 else "delivery-status"
        content_type = f'multipart/report; report-type={report}; boundary="{boundary}"'
        _set(top, "Content-Type", content_type)
        if not text.isascii() or returned_cte == "8bit":
            _set(top, "Content-Transfer-Encoding", "8bit")
        top.set_payload(parts)
        out = _render(top)
        if out.count(placeholder.encode()) != 1:
            continue
        if utf8:
            marker = f"=_{digest}_status".encode()
            if out.count(marker) != 1:
                continue
            out = out.replace(marker, status_body.rstrip(b"\r\n"))
        out = out.replace(placeholder.encode(), returned)
        if out.count(b"--" + boundary.encode()) == len(parts) + 1:
            return out
    raise AssertionError("no DSN boundary free of the content")  # needs a sha256 collision


# -- header and text helpers ---------------------------------------------------------------


def _clean(text: str) -> str:
    """Controls, line/paragraph separators and lone surrogates become spaces; runs collapse."""
    chars = [
        " " if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp", "Zs") else ch for ch in text
    ]
    return " ".join("".join(chars).split())


def _escape(text: str, also: str = "") -> str:
    """ASCII form of cleaned `text`: RFC 6533 `\\x{HEX}` for non-ASCII and for chars in `also`."""
    return "".join(f"\\x{{{ord(ch):02X}}}" if ord(ch) > 0x7E or ch in also else ch for ch in text)


def _token(text: str, allowed: str) -> str:
    """A Message-ID/boundary-safe token: alphanumerics and `allowed`, others become '-'."""
    chars = [ch if (ch.isascii() and ch.isalnum()) or ch in allowed else "-" for ch in _clean(text)]
    return re.sub(r"\.{2,}", ".", "".join(chars)).strip(".-")


def _address(addr: str) -> str:
    cleaned = _clean(addr)
    if cleaned.startswith("<") and cleaned.endswith(">"):
        cleaned = cleaned[1:-1].strip()
    return cleaned


def _address_field(addr: str) -> str:
    """An RFC 3464 address field value: `rfc822; a@b`, or RFC 6533 `utf-8; ` xtext form."""
    if addr.isascii():
        return f"rfc822; {addr}"
    return "utf-8; " + _escape(addr, also=" +=\\")


def _fold(name: str, value: str) -> str:
    """Fold a one-line value at spaces: 78 columns where possible, never past 998 octets."""
    width = LINE_MAX_OCTETS - len(name) - 3  # what fits after "Name: " or a leading space
    words: list[str] = []
    for word in value.split(" "):
        # Unbreakable words longer than a line are cut by octets' worth of characters.
        step = max(width // 4, 1) if not word.isascii() else width
        words += [word[i : i + step] for i in range(0, len(word), step)] if word else []
    lines = [""]
    for word in words:
        prefix = len(name) + 2 if len(lines) == 1 else 1
        if lines[-1] and prefix + len(lines[-1]) + 1 + len(word) > _FOLD_COLUMNS:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return "\n ".join(lines)


def _set(msg: Message, name: str, value: str) -> None:
    # compat32 stores the string as given; _POLICY emits it unchanged (lines <= 998).
    msg[name] = _fold(name, value)


def _date(ms: int) -> str:
    return format_datetime(datetime.fromtimestamp(ms // 1000, tz=UTC))


def _digest(items: Iterable[str | bytes | int]) -> str:
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, int):
            item = str(item)
        data = item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)  # not joined first: that copied the whole original
    return h.hexdigest()


# -- the parts ------------------------------------------------------------------------------


def _subject(reported: list[FailedRecipient]) -> str:
    failed = sum(r.action in ("failed", "delayed") for r in reported)
    if failed == len(reported):
        return "Undelivered Mail Returned to Sender"
    return "Successful Mail Delivery Report" if not failed else "Mail Delivery Status Report"


def _headers(
    msg: Message, host: str, sender: str, msgid: str, now_ms: int, own_id: str, subject: str
) -> None:
    _set(msg, "From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
    _set(msg, "To", f"<{sender}>")
    _set(msg, "Subject", subject)
    _set(msg, "Auto-Submitted", "auto-replied")
    _set(msg, "Date", _date(now_ms))
    _set(msg, "Message-ID", own_id)
    original_id = _clean(msgid)
    if _MSGID_RE.fullmatch(original_id):
        _set(msg, "In-Reply-To", original_id)
        _set(msg, "References", original_id)
    _set(msg, "MIME-Version", "1.0")


def _explain(rcpt: FailedRecipient) -> str:
    diagnostic = _clean(rcpt.diagnostic)[:MAX_DIAGNOSTIC_CHARS]
    remote = _clean(rcpt.remote_mta)
    said = f"host {remote} said: {diagnostic}" if remote and diagnostic else diagnostic
    if rcpt.status.startswith("2"):
        via = f"delivery via {remote}" if remote else "delivered"
        return f"<{_address(rcpt.address)}>: {via}: {diagnostic}" if diagnostic else via
    if rcpt.status.startswith("4"):  # a deferral that outlived the queue lifetime
        reason = "the message expired in the queue after temporary failures"
        reason += f"; last reply: {said}" if said else ""
    else:
        reason = said or f"delivery failed (status {rcpt.status})"
    return f"<{_address(rcpt.address)}>: {reason}"


def _human_text(host: str, failed: list[FailedRecipient], returned_type: str) -> str:
    whole = returned_type in ("message/rfc822", "message/global")
    attached = "message" if whole else "message's headers"
    lines = [f"This is the mail system at host {host}.", ""]
    if any(r.status[0] != "2" for r in failed):
        lines.append("Your message could not be delivered to one or more recipients.")
    if any(r.status[0] == "2" for r in failed):
        lines += textwrap.wrap(_SUCCESS_TEXT, width=_TEXT_COLUMNS)
    lines += [
        f"The delivery report and the returned {attached} are attached.",
        "For help, forward this report to your postmaster.",
        "",
    ]
    for rcpt in failed:
        lines += textwrap.wrap(
            _explain(rcpt), width=_TEXT_COLUMNS, subsequent_indent="    ", break_on_hyphens=False
        )
        lines.append("")
    return "\r\n".join(lines)


def _status_blocks(
    queue_id: str,
    host: str,
    sender: str,
    arrival_ms: int,
    failed: list[FailedRecipient],
    envelope_id: str,
) -> list[list[tuple[str, str]]]:
    # RFC 3464 2.2.1: the ENVID as the client gave it, in xtext (no CR/LF can get in).
    envid = [("Original-Envelope-Id", xtext_encode(envelope_id))] if envelope_id else []
    blocks = [
        [
            *envid,
            ("Reporting-MTA", f"dns; {_escape(host)}"),
            ("X-Mqnode-Queue-ID", _escape(_clean(queue_id))),
            ("X-Mqnode-Sender", _address_field(sender)),
            ("Arrival-Date", _date(arrival_ms)),
        ]
    ]
    for rcpt in failed:
        fields: list[tuple[str, str]] = []
        if _address(rcpt.original_recipient):
            fields.append(("Original-Recipient", _address_field(_address(rcpt.original_recipient))))
        fields.append(("Final-Recipient", _address_field(_address(rcpt.address))))
        fields += [("Action", rcpt.action), ("Status", rcpt.status)]
        if _clean(rcpt.remote_mta):
            fields.append(("Remote-MTA", f"dns; {_escape(_clean(rcpt.remote_mta))}"))
        diagnostic = _clean(rcpt.diagnostic)[:MAX_DIAGNOSTIC_CHARS]
        if diagnostic:
            fields.append(("Diagnostic-Code", f"smtp; {_escape(diagnostic)}"))
        blocks.append(fields)
    return blocks


def _leaf(content_type: str, cte: str, payload: str) -> Message:
    part = Message(policy=email_policy.compat32)
    _set(part, "Content-Type", content_type)
    _set(part, "Content-Transfer-Encoding", cte)
    part.set_payload(payload)
    return part


def _text_part(text: str) -> Message:
    if text.isascii():
        return _leaf('text/plain; charset="us-ascii"', "7bit", text)
    # Bytes are stored surrogate-escaped; BytesGenerator writes them back unchanged.
    part = _leaf('text/plain; charset="utf-8"', "8bit", "")
    part.set_payload(text.encode("utf-8"))
    return part


def _status_part(blocks: list[list[tuple[str, str]]]) -> Message:
    part = Message(policy=email_policy.compat32)
    _set(part, "Content-Type", "message/delivery-status")
    payload: list[Message | str] = []
    for fields in blocks:
        block = Message(policy=email_policy.compat32)
        for name, value in fields:
            _set(block, name, value)
        payload.append(block)
    part.set_payload(payload)
    return part


def _render(msg: Message) -> bytes:
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=_POLICY).flatten(msg)
    return buf.getvalue()


# -- the returned original -----------------------------------------------------------------


def _is_global(sender: str, failed: list[FailedRecipient], original: bytes) -> bool:
    """An SMTPUTF8 message (UTF-8 addresses or header fields): RFC 6533's global types."""
    addresses = [sender, *(r.address for r in failed), *(r.original_recipient for r in failed)]
    if not all(a.isascii() for a in addresses):
        return True
    end = original.find(b"\n\n")
    end2 = original.find(b"\r\n\r\n")
    ends = [e for e in (end, end2) if e >= 0]
    head = original[: min(ends)] if ends else original
    return not head.isascii() and _is_utf8(head)


def _returned_part(
    original: bytes, max_bytes: int, headers_only: bool, utf8: bool
) -> tuple[str, str, bytes]:
    """(Content-Type, Content-Transfer-Encoding, body) of part 3; CRLF line endings.

    `utf8`: an SMTPUTF8 message goes back as message/global, or its header block as
    message/global-headers (RFC 6533 6.3, 6.4), in 8bit.
    """
    if headers_only or len(original) > max_bytes + 2:  # CRLF-joined, it would be longer
        # Only lines that start within max_bytes + 3 can be kept (each counts its length
        # and 2): a list of every line of a big message of short ones took ~10 times it.
        lines = original[: max_bytes + 3].splitlines()
    else:
        lines = original.splitlines()
        whole = b"\r\n".join(lines)
        if len(whole) <= max_bytes and _eight_bit_safe(lines):
            return ("message/global" if utf8 else "message/rfc822"), _cte(whole), whole
    head = _header_block(lines, max_bytes)
    block = b"\r\n".join(head)
    if not _eight_bit_safe(head):
        encoded = base64.encodebytes(block).splitlines()
        return "text/rfc822-headers", "base64", b"\r\n".join(encoded)
    if utf8:
        return "message/global-headers", _cte(block), block
    content_type = "text/rfc822-headers"
    if not block.isascii() and _is_utf8(block):
        content_type += '; charset="utf-8"'
    return content_type, _cte(block), block


def _header_block(lines: list[bytes], max_bytes: int) -> list[bytes]:
    """The original's header lines, whole fields only, at most `max_bytes` with CRLFs."""
    fields: list[list[bytes]] = []
    for line in lines:
        if not line:
            break
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    kept: list[bytes] = []
    size = 0
    for field in fields:
        field_size = sum(len(line) + 2 for line in field)
        if size + field_size > max_bytes + 2:  # the last line needs no CRLF of its own
            break
        kept += field
        size += field_size
    return kept


def _eight_bit_safe(lines: list[bytes]) -> bool:
    return all(len(line) <= LINE_MAX_OCTETS and b"\0" not in line for line in lines)


def _cte(data: bytes) -> str:
    return "7bit" if data.isascii() else "8bit"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
