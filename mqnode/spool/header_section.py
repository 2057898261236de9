"""header_section: a message's header fields end with an empty line (RFC 5322 2.1).

A client may send a message whose header section ends without the empty line:
text with no header at all, or headers followed by a line that is no field
("name: value") and no folded continuation of one. Receivers then read that
line as a malformed header field, and DKIM signing (dkimpy) refuses the
message. Postfix's cleanup ends the header section at that line and puts an
empty line in front of it; `separated` does the same, before intake adds its
own fields on top (intake.py).
"""

from __future__ import annotations

import re

# Fields (a name of printable ASCII but ":", with the obsolete blanks before the colon),
# each with its folded continuation lines, from the start of the message. A line ends
# at CRLF, or at a bare CR or LF, which delivery sends as CRLF (line_ends.py).
_EOL = rb"(?:\r\n|\r|\n|\Z)"
_FIELDS = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*%s(?:[ \t][^\r\n]*%s)*)*" % (_EOL, _EOL))


def separated(message: bytes) -> bytes:
    """`message` with an empty line where its header section ends without one.

    One match from the start (~2 us for 10 fields, 4 for 20)."""
    end = _FIELDS.match(message).end()  # type: ignore[union-attr]  # matches b"" at least
    if end == len(message) or message.startswith((b"\r", b"\n"), end):
        return message
    return message[:end] + b"\r\n" + message[end:]
