"""header_section.separated: an empty line where the header section ends without one,
against a line-by-line model, and on the shapes Postfix's cleanup was seen to fix."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.spool.header_section import separated

_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


def _model(message: bytes) -> bytes:
    """Line by line (a line ends at CRLF, CR or LF): fields and their continuations,
    then, unless the message ended or the next line is empty, CRLF."""
    pos, first = 0, True
    while pos < len(message):
        m = re.compile(rb"[^\r\n]*(\r\n|\r|\n|$)").match(message, pos)
        assert m is not None
        line = message[pos : m.start(1)]
        if line == b"" and m.group(1):
            return message  # the empty line: the header section ends as it should
        if not (_FIELD.match(line) or (not first and line[:1] in (b" ", b"\t"))):
            return message[:pos] + b"\r\n" + message[pos:]
        first, pos = False, m.end()
    return message


pieces = st.sampled_from(
    [b"From: a@x.test", b"Subject : obs", b" folded", b"\tfolded", b"X-\xff: y", b"Bad Name: x",
     b"text", b"", b":x", b"From a@x.test Mon", b"Subject: \xc3\xa9"]
)  # fmt: skip
ends = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@given(st.lists(st.tuples(pieces, ends), max_size=8))
def test_separated_is_the_line_model(lines: list[tuple[bytes, bytes]]) -> None:
    message = b"".join(text + end for text, end in lines)
    assert separated(message) == _model(message)


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
    ],
)
def test_shapes(sent: bytes, kept: bytes | None) -> None:
    assert separated(sent) == (sent if kept is None else kept)
