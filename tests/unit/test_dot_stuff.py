"""dot_stuff (delivery/client.py): what goes on the wire after DATA, checked against the
plain definition (every line end made CRLF, every leading dot doubled) with Hypothesis."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mqnode.delivery.client import dot_stuff

_DOT_LINE = re.compile(rb"(?m)^\.")


def _reference(body: bytes) -> bytes:
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    body = _DOT_LINE.sub(b"..", body)
    return body if body.endswith(b"\r\n") else body + b"\r\n"


@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"x" * 80])))
def test_equals_the_definition(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert dot_stuff(body) == _reference(body)


def test_a_clean_body_comes_back_as_it_was() -> None:
    body = b"Subject: x\r\n\r\n" + b"line\r\n" * 1000
    assert dot_stuff(body) == body
    assert dot_stuff(b".\r\nx\r\n.y") == b"..\r\nx\r\n..y\r\n"
