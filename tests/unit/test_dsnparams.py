"""RFC 3461 parameters: parsing as sent, xtext, and what goes to the next hop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.spool.dsnparams import (
    DsnParamError,
    DsnRequest,
    mail_params,
    rcpt_params,
    split_params,
    xtext_decode,
    xtext_encode,
)


@given(st.text(max_size=60))
def test_xtext_round_trips_any_text(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "\r" not in encoded
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot come from a client
    assert xtext_decode(encoded) == text


def test_xtext_examples() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("Ticket+2B42") == "Ticket+42"
    for bad in ("a=b", "a+2", "a+zz", "a b", "a+2b"):  # '=' raw, short or lower-case hex
        with pytest.raises(DsnParamError, match=r"^501 5\.5\.4"):
            xtext_decode(bad)


def test_split_keeps_case_and_leaves_the_rest_to_aiosmtpd() -> None:
    rest, dsn = split_params("SIZE=10 ret=hdrs EnvId=Abc+2Bdef BODY=8BITMIME")
    assert rest == "SIZE=10 BODY=8BITMIME"
    assert dsn == {"RET": "hdrs", "ENVID": "Abc+2Bdef"}
    assert mail_params(dsn) == ("HDRS", "Abc+def")


@pytest.mark.parametrize(
    "params",
    ["RET=FULL RET=HDRS", "NOTIFY", "ENVID="],
    ids=["repeated", "no-value", "empty-value"],
)
def test_split_refuses_repeats_and_bare_keywords(params: str) -> None:
    with pytest.raises(DsnParamError, match=r"^501 5\.5\.4"):
        split_params(params)


@pytest.mark.parametrize(
    ("given", "reply"),
    [
        ({"RET": "ALL"}, "501 5.5.4"),
        ({"ENVID": "x" * 101}, "501 5.5.4"),
        ({"NOTIFY": "NEVER"}, "555 5.5.4"),
    ],
)
def test_mail_refusals(given: dict[str, str], reply: str) -> None:
    with pytest.raises(DsnParamError, match=f"^{reply}"):
        mail_params(given)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"NOTIFY": "never"}, ("NEVER", "")),
        ({"NOTIFY": "success,Failure"}, ("SUCCESS,FAILURE", "")),
        (
            {"NOTIFY": "DELAY", "ORCPT": "rfc822;Bob+2Bx@Old.Example"},
            ("DELAY", "rfc822;Bob+x@Old.Example"),
        ),
        ({"ORCPT": "utf-8;b@x"}, ("", "utf-8;b@x")),
    ],
)
def test_rcpt_params(given: dict[str, str], expected: tuple[str, str]) -> None:
    assert rcpt_params(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        {"NOTIFY": "NEVER,SUCCESS"},
        {"NOTIFY": "SUCCESS,SUCCESS"},
        {"NOTIFY": "ALWAYS"},
        {"ORCPT": "no-semicolon"},
        {"ORCPT": ";a@b"},
        {"ORCPT": "rfc822;" + "a" * 500},
        {"RET": "FULL"},
    ],
)
def test_rcpt_refusals(given: dict[str, str]) -> None:
    with pytest.raises(DsnParamError, match=r"^50|^55"):
        rcpt_params(given)


def test_what_the_sender_hears_of_by_recipient() -> None:
    req = DsnRequest(notify=("", "NEVER", "SUCCESS", "SUCCESS,FAILURE", "DELAY"))
    assert [req.wants_failure(i) for i in range(6)] == [True, False, False, True, False, True]
    assert [req.wants_success(i) for i in range(6)] == [False, False, True, True, False, False]
    assert not DsnRequest() and not DsnRequest(notify=("", "")) and req


def test_what_goes_to_the_next_hop() -> None:
    req = DsnRequest("HDRS", "env id", ("SUCCESS", ""), ("rfc822;a+b@x", ""))
    assert req.mail_options() == ["RET=HDRS", "ENVID=env+20id"]
    assert req.rcpt_options(0) == ["NOTIFY=SUCCESS", "ORCPT=rfc822;a+2Bb@x"]
    assert req.rcpt_options(1) == []
    assert DsnRequest.from_record(req.to_record()) == req
    assert req.original_address(0) == "a+b@x" and req.original_address(1) == ""
    assert DsnRequest(orcpt=("x400;c=us",)).original_address(0) == ""
