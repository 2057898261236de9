"""SubmissionProtocol._getaddr: the fast path answers exactly as aiosmtpd's parser does."""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from mqnode.smtp.protocol import SubmissionProtocol

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
SPECIALS = ' \t()<>@,:;."[]\\'


def session(local_part_limit: int = 0) -> Any:
    proto = object.__new__(SubmissionProtocol)  # _getaddr needs no connection
    proto.local_part_limit = local_part_limit
    return proto


def reference(arg: str, local_part_limit: int = 0) -> Any:
    """aiosmtpd's answer; where email's parser crashes, ours is "bad address" (None, None)."""
    try:
        return SMTP._getaddr(session(local_part_limit), arg)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None, None


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.c> SIZE=10",
        "<a@b.c>",
        " <a@b.c>  BODY=8BITMIME",
        "<a@b.c>\tSIZE=1",
        "<first.last+tag@sub.example.test>",
        "<a@b.c>(comment) SIZE=1",  # the parser strips the comment
        "<a@b..c>",  # not a dot-atom: the parser refuses it
        "<a@b.c.>",
        '<"quoted local"@example.test>',
        "<a@[127.0.0.1]>",
        "<@route:a@b.c>",
        "<>",
        "a@b.c",  # no angle brackets
        "",
        "<ünïcode@example.test>",
        "<0@[@0>",  # email's parser raises AttributeError: a bad address, not a crash
    ],
)
def test_same_answer_as_aiosmtpd(arg: str) -> None:
    assert SubmissionProtocol._getaddr(session(), arg) == reference(arg)


def test_a_path_that_crashes_the_parser_is_a_bad_address() -> None:
    assert SubmissionProtocol._getaddr(session(), "<0@[@0>") == (None, None)


def test_local_part_limit_applies_on_the_fast_path() -> None:
    assert SubmissionProtocol._getaddr(session(3), "<abcd@b.c>") == (None, None)
    assert SubmissionProtocol._getaddr(session(4), "<abcd@b.c>") == ("abcd@b.c", "")


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet=ATEXT + SPECIALS, max_size=30),
    st.text(alphabet=ATEXT + ".", min_size=1, max_size=20),
    st.text(alphabet=ATEXT + " \t=(", max_size=15),
)
def test_generated_paths_agree(local: str, domain: str, rest: str) -> None:
    arg = f"<{local}@{domain}>{rest}"
    assert SubmissionProtocol._getaddr(session(), arg) == reference(arg)
