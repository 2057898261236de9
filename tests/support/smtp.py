"""SMTP client helpers for tests: submit without raising, and build test messages.

`submit` is all-or-nothing from the test's point of view: if any RCPT is
refused it returns that reply and sends no DATA, so a message is either
offered whole or not at all. It never raises on an SMTP reply; connection
problems (refused, reset, timeout) come back as code -1 with the error text.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import smtplib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_QUEUED_AS = re.compile(r"queued as (\S+)")
_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_LINE_BYTES = 76
CRLF = b"\r\n"


@dataclass(frozen=True)
class TestMessage:
    """An RFC 5322 message of an exact size with a unique Message-ID."""

    __test__ = False  # not a pytest test class

    data: bytes
    message_id: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _reply_text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def queue_id_from_reply(text: str) -> str | None:
    m = _QUEUED_AS.search(text)
    return m.group(1) if m else None


def submit(
    host: str,
    port: int,
    mail_from: str,
    rcpts: list[str],
    body: bytes,
    timeout: float = 30.0,
) -> tuple[int, str, str | None]:
    """Offer one message; return (code, reply text, queue id or None).

    The code is the first non-success reply (greeting, MAIL, RCPT or DATA),
    or the final DATA reply; -1 means the connection failed or dropped.
    """
    try:
        with smtplib.SMTP(host, port, timeout=timeout, local_hostname="client.test") as client:
            code, raw = client.ehlo()
            if code != 250:
                return code, _reply_text(raw), None
            options = [f"SIZE={len(body)}"] if client.has_extn("size") else []
            code, raw = client.mail(mail_from, options)
            if code != 250:
                return code, _reply_text(raw), None
            for rcpt in rcpts:
                code, raw = client.rcpt(rcpt)
                if code not in (250, 251):
                    return code, _reply_text(raw), None
            try:
                code, raw = client.data(body)
            except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
                return exc.smtp_code, _reply_text(exc.smtp_error), None
            text = _reply_text(raw)
            return code, text, queue_id_from_reply(text) if code == 250 else None
    except smtplib.SMTPConnectError as exc:  # greeting was not 220 (e.g. 554)
        return exc.smtp_code, _reply_text(exc.smtp_error), None
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, _reply_text(exc.smtp_error), None
    except (smtplib.SMTPException, OSError) as exc:  # OSError covers timeouts
        return -1, f"{type(exc).__name__}: {exc}", None


def make_message(
    size: int,
    mail_from: str = "sender@client.test",
    rcpt: str = "rcpt@example.test",
    subject: str = "mqnode test",
) -> TestMessage:
    """A message of exactly `size` bytes (CRLF lines of <= 78 bytes, none starting with '.')."""
    message_id = f"<{uuid.uuid4().hex}@mqnode.test>"
    headers = CRLF.join(
        [
            f"From: {mail_from}".encode(),
            f"To: {rcpt}".encode(),
            f"Subject: {subject}".encode(),
            f"Message-ID: {message_id}".encode(),
            b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=us-ascii",
        ]
    )
    head = headers + CRLF + CRLF
    if size < len(head) + len(CRLF):
        raise ValueError(f"size {size} is below the minimum of {len(head) + len(CRLF)} bytes")
    # varied (not compressible to nothing) but cheap: slices of a per-message pattern
    digest = hashlib.sha256(message_id.encode()).digest() * 128
    pattern = bytes(_ALPHABET[b % len(_ALPHABET)] for b in digest)
    lines: list[bytes] = []
    remaining = size - len(head)
    n = 0
    while remaining > 0:
        # each line is text + CRLF; the last one takes what is left (never a lone byte)
        text_len = min(_LINE_BYTES, remaining - len(CRLF))
        if remaining - text_len - len(CRLF) == 1:
            text_len -= 1
        start = (n * 37) % (len(pattern) - _LINE_BYTES)
        lines.append(pattern[start : start + text_len] + CRLF)
        remaining -= text_len + len(CRLF)
        n += 1
    data = head + b"".join(lines)
    assert len(data) == size, (len(data), size)
    return TestMessage(data=data, message_id=message_id)


def make_attachment(size: int, mail_from: str = "a@client.test") -> TestMessage:
    """A message of about `size` bytes that does not compress: random bytes in base64."""
    message_id = f"<attachment-{uuid.uuid4().hex}@mqnode.test>"
    head = (
        f"From: {mail_from}\r\nTo: r@example.test\r\nMessage-ID: {message_id}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    b64 = base64.encodebytes(os.urandom(max(size - len(head), 0) * 3 // 4))
    return TestMessage(data=head + b64.replace(b"\n", CRLF), message_id=message_id)


_WORDS = [bytes(random.Random(w).choices(_ALPHABET[:26], k=3 + w % 7)) for w in range(2000)]


def make_prose(size: int, mail_from: str = "a@client.test") -> TestMessage:
    """A message of about `size` bytes of words drawn at random: it deflates to about
    two fifths, as prose does (`make_message`'s text deflates to a few percent)."""
    message_id = f"<prose-{uuid.uuid4().hex}@mqnode.test>"
    head = f"From: {mail_from}\r\nTo: r@example.test\r\nMessage-ID: {message_id}\r\n\r\n"
    rng = random.Random(message_id)
    lines: list[bytes] = []
    total = len(head)
    while total < size:
        line = b" ".join(rng.choices(_WORDS, k=10)) + CRLF
        lines.append(line)
        total += len(line)
    return TestMessage(data=head.encode() + b"".join(lines), message_id=message_id)


def submit_attachments(host: str, port: int, count: int, size: int, threads: int = 4) -> set[str]:
    """`count` distinct messages of ~`size` bytes that do not compress, over `threads`
    sessions at once, each answered 250; their Message-IDs."""

    def one(k: int) -> str:
        msg = make_attachment(size)
        code, text, _ = submit(host, port, "a@c.test", ["r@x.test"], msg.data)
        assert code == 250, (k, code, text)
        return msg.message_id

    with ThreadPoolExecutor(threads) as pool:
        return set(pool.map(one, range(count)))
