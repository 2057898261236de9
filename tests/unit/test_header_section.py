"""header_section.cleaned: an empty line where the header section ends without one, and
no Bcc, Resent-Bcc, Return-Path or Content-Length field, against a line-by-line model
and on the shapes Postfix's cleanup was seen to fix."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.spool.header_section import DROPPED, cleaned, has_date, received_count

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def _model(message: bytes) -> bytes:
    """Line by line (a line ends at CRLF, CR or LF): fields and their continuations, each
    kept unless its name is dropped; then, unless the message ended or the next line is
    empty, CRLF; then the rest."""
    line_re = re.compile(rb"[^\r\n]*(\r\n|\r|\n|$)")
    pos, first, kept, keep = 0, True, b"", True
    while pos < len(message):
        m = line_re.match(message, pos)
        assert m is not None
        line = message[pos : m.start(1)]
        if line == b"" and m.group(1):
            return kept + message[pos:]  # the empty line: the header section ends here
        field = _FIELD.match(line)
        if field:
            keep = field.group(1).lower() not in DROPPED
        elif first or line[:1] not in (b" ", b"\t"):
            return kept + b"\r\n" + message[pos:]
        if keep:
            kept += message[pos : m.end()]
        first, pos = False, m.end()
    return kept


pieces = st.sampled_from(
    [b"From: a@x.test", b"Subject : obs", b" folded", b"\tfolded", b"X-\xff: y", b"Bad Name: x",
     b"text", b"", b":x", b"From a@x.test Mon", b"Subject: \xc3\xa9", b"Bcc: b@x.test",
     b"BCC : c@x.test", b"Resent-Bcc: d", b"Return-Path: <e>", b"content-length: 5",
     b"X-Bcc: kept", b"Subject: about bcc"]
)  # fmt: skip
ends = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@given(st.lists(st.tuples(pieces, ends), max_size=8))
def test_cleaned_is_the_line_model(lines: list[tuple[bytes, bytes]]) -> None:
    message = b"".join(text + end for text, end in lines)
    assert cleaned(message) == _model(message)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"hello\r\nworld\r\n", b"\r\nhello\r\nworld\r\n"),  # no header at all
        (b"From: a@x.test\r\nhello\r\n", b"From: a@x.test\r\n\r\nhello\r\n"),
        (b"Subject: s\r\n folded\r\n\r\nbody\r\n", None),  # as it should be
        (b"Subject: s", None),  # headers only, no line end
        (b"", None),
        (b"\r\nbody only\r\n", None),
        (b"Subject: s\rtext\r\n", b"Subject: s\r\r\ntext\r\n"),  # a bare CR ends a line too
        (
            b"From: a@x.test\r\nBcc: b@x.test,\r\n c@x.test\r\nReturn-Path: <f@x.test>\r\n"
            b"Content-Length: 4\r\nResent-Bcc: d@x.test\r\n\r\nBcc: in the body\r\n",
            b"From: a@x.test\r\n\r\nBcc: in the body\r\n",
        ),
        (b"Bcc: b@x.test\r\ntext\r\n", b"\r\ntext\r\n"),
    ],
)
def test_shapes(sent: bytes, kept: bytes | None) -> None:
    assert cleaned(sent) == (sent if kept is None else kept)


@pytest.mark.parametrize(
    ("message", "found"),
    [
        (b"From: a@x.test\r\nDate: Tue, 8 Dec 2026 01:00:00 +0000\r\n\r\nb", True),
        (b"DATE : x\r\n\r\nb", True),
        (b"From: a@x.test\r\nDated: x\r\nX-Date: y\r\n\r\nDate: in the body\r\n", False),
        (b"Subject: s\nDate: x\n\nb", True),
        (b"", False),
    ],
)
def test_has_date(message: bytes, found: bool) -> None:
    assert has_date(message) is found


def test_received_count() -> None:
    hops = b"".join(b"Received: from h%d\r\n\tby h%d; date\r\n" % (i, i) for i in range(7))
    assert received_count(hops + b"Received-SPF: pass\r\nSubject: s\r\n\r\nReceived: x\r\n") == 7
    assert received_count(b"RECEIVED: a\nreceived: b\n\nbody") == 2
    assert received_count(b"Subject: no hops\r\n\r\n") == 0
