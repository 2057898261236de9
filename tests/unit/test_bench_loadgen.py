"""bench/loadgen.make_body: the three kinds of content the paired benches send."""

from __future__ import annotations

import zlib

import pytest

from bench.loadgen import ATTACHMENT, CONTENTS, NEWSLETTER, TEXT, make_body
from mqnode.raft.wire import compressible


def _ratio(body: bytes) -> float:
    return len(zlib.compress(body, 1)) / len(body)


@pytest.mark.parametrize("size", [100 * 1024, 1024 * 1024])
@pytest.mark.parametrize("content", CONTENTS)
def test_bodies_are_about_the_size_asked_distinct_and_smtp_clean(content: str, size: int) -> None:
    (id1, one), (id2, two) = make_body(1, "r", size, content), make_body(2, "r", size, content)
    assert id1 != id2 and one != two
    if content != TEXT:  # text: one line repeated, only the headers differ
        assert one.split(b"\r\n\r\n", 1)[1] != two.split(b"\r\n\r\n", 1)[1]
    assert abs(len(one) - size) < 100
    lines = one.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998 and b"\n" not in b"".join(lines)
    assert one.endswith(b"\r\n") or content == TEXT  # text ends mid-line; the client ends it


def test_how_each_kind_deflates() -> None:
    """Text is the journal's best case, an attachment its worst, HTML in between."""
    size = 100 * 1024
    assert _ratio(make_body(1, "r", size, TEXT)[1]) < 0.05
    assert _ratio(make_body(1, "r", size, ATTACHMENT)[1]) > 0.7
    html = make_body(1, "r", size, NEWSLETTER)[1]
    assert 0.25 < _ratio(html) < 0.5 and compressible(html)
