"""Retry schedule, queue ids, and the pure ingress helpers (addresses, Message-ID, idem keys)."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.clock import ManualClock
from mqnode.delivery.retry import RetryPolicy
from mqnode.intake import idempotency_key
from mqnode.smtp.handler import valid_address
from mqnode.spool import addresses
from mqnode.spool.model import find_message_id, make_queue_id

# -- RetryPolicy ---------------------------------------------------------------------------

SCHEDULE_S = [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0, 4000.0, 4000.0]


def test_schedule_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy()
    assert [policy.delay_s(a, lambda: 0.5) for a in range(1, 9)] == SCHEDULE_S
    assert policy.delay_s(0, lambda: 0.5) == 300.0


def test_schedule_follows_the_settings() -> None:
    policy = RetryPolicy(retry_base_s=10, retry_max_s=50, jitter_ratio=0.0)
    assert [policy.delay_s(a, lambda: 0.9) for a in range(1, 6)] == [10, 20, 40, 50, 50]


@given(st.integers(0, 200), st.floats(0.0, 1.0, exclude_max=True))
def test_jitter_stays_within_ten_percent(attempts: int, u: float) -> None:
    base = SCHEDULE_S[min(max(attempts, 1), len(SCHEDULE_S)) - 1]
    delay = RetryPolicy().delay_s(attempts, lambda: u)
    assert base * 0.9 - 1e-9 <= delay < base * 1.1 + 1e-9


def test_jitter_extremes() -> None:
    policy = RetryPolicy()
    assert policy.delay_s(1, lambda: 0.0) == pytest.approx(270.0)
    assert policy.delay_s(1, lambda: 0.999999) == pytest.approx(330.0, abs=0.01)
    assert policy.delay_s(9, lambda: 0.0) == pytest.approx(3600.0)


def test_next_attempt_times_from_a_manual_clock() -> None:
    # How the dispatcher uses it: next_attempt_ms = now + delay, after each failed attempt.
    clock, policy = ManualClock(), RetryPolicy(jitter_ratio=0.0)
    due: list[int] = []
    for attempts in range(1, 7):
        delay_s = policy.delay_s(attempts, lambda: 0.5)
        due.append(clock.wall_ms() + int(delay_s * 1000))
        clock.advance(delay_s)
        assert clock.wall_ms() == due[-1]
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert gaps == [600_000, 1_200_000, 2_400_000, 4_000_000, 4_000_000]


@pytest.mark.parametrize("attempts", [1025, 5000])
def test_delay_stays_capped_for_very_many_attempts(attempts: int) -> None:
    assert RetryPolicy().delay_s(attempts, lambda: 0.5) == 4000.0


# -- queue ids ---------------------------------------------------------------------------------


@given(st.integers(0, 2**48 - 1), st.binary(min_size=4, max_size=16))
def test_queue_id_carries_time_and_four_random_bytes(wall_ms: int, rnd: bytes) -> None:
    qid = make_queue_id(wall_ms, rnd)
    assert len(qid) == 16 and qid.isalnum() and qid == qid.upper()
    raw = base64.b32hexdecode(qid)
    assert int.from_bytes(raw[:6], "big") == wall_ms
    assert raw[6:] == rnd[:4]


def test_queue_id_needs_four_random_bytes() -> None:
    with pytest.raises(ValueError):
        make_queue_id(1, b"abc")


@given(st.integers(0, 2**48 - 2), st.integers(1, 10**9), st.binary(min_size=4, max_size=4))
def test_queue_ids_order_by_time_as_bytes(t: int, dt: int, rnd: bytes) -> None:
    # The decoded id orders by time, whatever the random part.
    later = min(t + dt, 2**48 - 1)
    a = base64.b32hexdecode(make_queue_id(t, rnd))
    b = base64.b32hexdecode(make_queue_id(later, b"\0\0\0\0"))
    assert a < b


def test_queue_ids_sort_by_time_as_text() -> None:
    clock = ManualClock(wall_ms=1_700_000_004_990)
    ids = []
    for _ in range(20):
        ids.append(make_queue_id(clock.wall_ms(), b"\0\0\0\0"))
        clock.advance(0.001)
    # ...ZL3QY... (1_700_000_004_998) sorts after ...ZL3Q4... (1_700_000_004_999).
    assert ids == sorted(ids)


# -- valid_address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        "user@example.com",
        "first.last+tag@sub.example.org",
        "x@localhost",
        "a@b",
        "o'brien@example.ie",
        "user@xn--bcher-kva.example",
        "a@1.2.3.4",
        # RFC 5321 4.1.2/4.1.3: quoted local parts and address literals are mailboxes too
        '"john smith"@example.test',
        '"a\\"b@c"@example.test',
        "user@[192.0.2.4]",
        "user@[IPv6:::1]",
        "user@[IPv6:2001:db8::1]",
        # RFC 6531 (SMTPUTF8): UTF-8 local parts and U-label domains
        "user@bücher.test",
        "jöran@bücher.test",
        "x" * 64 + "@example.test",
    ],
)
def test_valid_addresses(addr: str) -> None:
    assert valid_address(addr, allow_empty=False)


@pytest.mark.parametrize(
    "addr",
    [
        "noat",
        "@example.com",
        "user@",
        "user@@example.com",
        "a@b@example.com",
        "a b@example.com",
        "<user@example.com>",
        "user@-example.com",
        "user@example.com-",
        "user@exa_mple.com",
        "user@[300.1.1.1]",
        "user@[::1]",  # IPv6 needs its tag
        "user@[IPv6:1.2.3.4]",
        "user@[tag:anything]",  # a general address literal: nothing routes it
        "user@[127.0.0.1",
        '"unterminated@example.com',
        '"tab\there"@example.com',
        "x" * 65 + "@example.test",  # local part over 64 octets
        "a..b@example.com",
        ".a@example.com",
        "user@bü--cher.test",  # not valid IDNA
        "us,er@example.com",
        'us"er@example.com',
        "user@example.com ",
        "x" * 250 + "@a.bc",
    ],
)
def test_invalid_addresses(addr: str) -> None:
    assert not valid_address(addr, allow_empty=False)


def test_empty_address_only_where_allowed() -> None:
    assert valid_address("", allow_empty=True)  # the null sender, MAIL FROM:<>
    assert not valid_address("", allow_empty=False)


def test_trailing_newline_is_not_an_address() -> None:
    assert not valid_address("user@example.com\n", allow_empty=False)


def test_non_ascii_only_with_smtputf8() -> None:
    assert not valid_address("jöran@example.org", allow_empty=False, utf8=False)
    assert not valid_address("user@bücher.test", allow_empty=False, utf8=False)
    assert valid_address('"john smith"@example.test', allow_empty=False, utf8=False)


def test_ascii_forms_route_idn_domains_by_their_a_labels() -> None:
    assert addresses.ascii_form("user@Bücher.test") == "user@xn--bcher-kva.test"
    assert addresses.ascii_form("jöran@bücher.test") is None  # needs SMTPUTF8
    assert addresses.ascii_form("user@[192.0.2.4]") == "user@[192.0.2.4]"


@given(st.text(max_size=300), st.booleans())
def test_valid_address_is_total(addr: str, allow_empty: bool) -> None:
    ok = valid_address(addr, allow_empty)
    assert isinstance(ok, bool)
    if ok and addr:
        assert len(addr) <= 254 and addr.count("@") == 1
        assert not any(c in addr for c in " \t<>")


# -- find_message_id ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"Message-ID: <abc@x.org>\r\nSubject: s\r\n\r\nbody\r\n", "<abc@x.org>"),
        (b"Subject: s\r\nmessage-id:<abc@x.org>  \r\n\r\nbody", "<abc@x.org>"),
        (b"Subject: s\nMESSAGE-ID:\t<abc@x.org>\n\nbody\n", "<abc@x.org>"),
        (b"Message-ID: <only@headers>", "<only@headers>"),
        (b"Subject: s\r\n\r\nMessage-ID: <in@body>\r\n", None),
        (b"X-Original-Message-ID: <other@x>\r\n\r\n", None),
        (b"Resent-Message-ID: <other@x>\r\n\r\n", None),
        (b"", None),
    ],
)
def test_find_message_id(body: bytes, expected: str | None) -> None:
    assert find_message_id(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"Message-ID:\r\n <abc@x.org>\r\nSubject: s\r\n\r\nbody",
        b"Message-ID:\n <abc@x.org>\nSubject: s\n\nbody",
    ],
    ids=["crlf", "lf"],
)
def test_find_message_id_unfolds(body: bytes) -> None:
    assert find_message_id(body) == "<abc@x.org>"


@given(st.binary(max_size=400))
def test_find_message_id_is_total(body: bytes) -> None:
    found = find_message_id(body)
    assert found is None or isinstance(found, str)


# -- idempotency_key ------------------------------------------------------------------------

no_nul = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)


@given(no_nul, st.lists(no_nul, min_size=1, max_size=4), st.binary(max_size=100))
def test_idempotency_key_is_stable(mail_from: str, rcpts: list[str], body: bytes) -> None:
    key = idempotency_key(mail_from, rcpts, body)
    assert len(key) == 32
    assert key == idempotency_key(mail_from, list(rcpts), bytes(body))


@given(
    st.tuples(no_nul, st.lists(no_nul, min_size=1, max_size=3), st.binary(max_size=50)),
    st.tuples(no_nul, st.lists(no_nul, min_size=1, max_size=3), st.binary(max_size=50)),
)
def test_idempotency_key_separates_envelopes(
    a: tuple[str, list[str], bytes], b: tuple[str, list[str], bytes]
) -> None:
    if a != b:
        assert idempotency_key(*a) != idempotency_key(*b)


def test_idempotency_key_does_not_run_fields_together() -> None:
    body = b"x"
    assert idempotency_key("a@b", ["c@d"], body) != idempotency_key("a@bc", ["@d"], body)
    assert idempotency_key("a@b", ["c@d", "e@f"], body) != idempotency_key("a@b", ["c@de@f"], body)
