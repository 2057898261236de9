"""line_ends: the CRLF check and rewrite against a plain model of bare CRs and LFs."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mqnode.spool.line_ends import crlf_line_ends, only_crlf

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
texts = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\xff"]), max_size=40)


@given(texts)
def test_only_crlf_is_no_bare_cr_or_lf(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert only_crlf(body) == (_BARE.search(body) is None)


@given(texts)
def test_crlf_line_ends_makes_each_bare_end_crlf(parts: list[bytes]) -> None:
    body = b"".join(parts)
    got = crlf_line_ends(body)
    assert only_crlf(got)
    # each CRLF, bare CR and bare LF of the body is one CRLF, the rest as it was
    assert got == re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if only_crlf(body):
        assert got is body
