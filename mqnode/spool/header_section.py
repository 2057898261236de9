"""header_section: a message's header section as Postfix's cleanup leaves it.

Two things Postfix's cleanup always does to a message, and intake does too
(intake.py, for SMTP and the API, before its own fields go on top):

* The header fields end with an empty line (RFC 5322 2.1). A client may send
  text with no header at all, or headers followed by a line that is no field
  ("name: value") and no folded continuation of one. Receivers then read that
  line as a malformed header field, and DKIM signing (dkimpy) refuses the
  message. The header section ends at that line, with an empty line put in
  front of it.
* Bcc and Resent-Bcc fields are removed: the blind recipients are in the
  envelope, and in the header every recipient would read them. So are
  Return-Path (the final delivery writes it from the envelope sender) and
  Content-Length.

A line ends at CRLF, or at a bare CR or LF, which delivery sends as CRLF
(line_ends.py). The same read tells intake whether the message has a Date
field and how many Received fields (hops) it has.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import re
from typing import NamedTuple

_EOL = rb"(?:\r\n?|\n|\Z)"
# A field: a name of printable ASCII but ":" (with the obsolete blanks before the
# colon), and its folded continuation lines; `_FIELD` is what follows the name. The
# quantifiers are possessive: nothing here needs backtracking, and sre then skips it.
_FIELD = rb"[ \t]*+:[^\r\n]*+%s(?:[ \t][^\r\n]*+%s)*+" % (_EOL, _EOL)
_FIELDS = re.compile(rb"(?:[!-9;-~]++%s)*+" % _FIELD)
_ONE_FIELD = re.compile(rb"([!-9;-~]++)%s" % _FIELD)  # with its name
DROPPED = frozenset({b"bcc", b"resent-bcc", b"return-path", b"content-length"})
HOPCOUNT_LIMIT = 50  # Received fields that make a message a mail loop (Postfix's default)


class Header(NamedTuple):
    """A message's header section, read once (`inspect`)."""

    message: bytes  # the message with its header section as Postfix's cleanup leaves it
    has_date: bool  # whether it has a Date field
    received: int  # its Received fields: the hops it made (a loop at `hopcount_limit`)


def inspect(message: bytes) -> Header:
    """One match of the header section from the start, and that section lowercased once
    and searched (~2-3 us for 10 fields; the body is never scanned). The fields are taken
    apart only when a name to drop occurs in the header at all. A Received field with
    blanks before its colon (obsolete syntax) is not counted."""
    end = _FIELDS.match(message).end()  # type: ignore[union-attr]  # matches b"" at least
    ended = end == len(message) or message.startswith((b"\r", b"\n"), end)
    head = message[:end]
    low = head.lower()
    received = _at_line_starts(low, b"received:")
    if b"bcc" in low or b"return-path" in low or b"content-length" in low:
        kept = b"".join(
            m.group(0) for m in _ONE_FIELD.finditer(head) if m.group(1).lower() not in DROPPED
        )
        low = kept.lower()
        message = kept + (b"" if ended else b"\r\n") + message[end:]
    elif not ended:
        message = head + b"\r\n" + message[end:]
    return Header(message, _has_date(low), received)


_COLON = re.compile(rb"[ \t]*:")


def _at_line_starts(low: bytes, text: bytes) -> int:
    """How many lines of `low` start with `text` (after LF, or a bare CR)."""
    return low.startswith(text) + low.count(b"\n" + text) + low.count(b"\r" + text)


def _has_date(low: bytes) -> bool:
    """Whether a lowercased header section has a Date field."""
    if _at_line_starts(low, b"date:"):
        return True
    for start in (b"\ndate", b"\rdate"):  # obsolete syntax: blanks before the colon
        pos = low.find(start)
        while pos >= 0:
            if _COLON.match(low, pos + 5):
                return True
            pos = low.find(start, pos + 5)
    return low.startswith(b"date") and _COLON.match(low, 4) is not None


def cleaned(message: bytes) -> bytes:
    """`message` with an empty line where its header section ends without one, and
    without the fields in DROPPED."""
    return inspect(message).message


def has_date(message: bytes) -> bool:
    return inspect(message).has_date


def received_count(message: bytes) -> int:
    return inspect(message).received


@functools.lru_cache(maxsize=4)
def rfc5322_date(second: int) -> str:
    """A Date or Received field's date-time, in UTC; messages of one second share one."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))
