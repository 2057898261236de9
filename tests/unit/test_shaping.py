"""Traffic shaping: the rules file (one line naming the site for a bad one), which site a
destination belongs to (domains, MX rollup, default), the pace, and the reaction to
throttling replies."""

from __future__ import annotations

import pytest

from mqnode.delivery.shaping import FLOOR_DIVISOR, SUSPEND_AFTER, Pace, SiteRate
from mqnode.errors import ConfigError
from mqnode.spool.commands import SetShaping, decode_entry, encode_entry
from mqnode.spool.shaping_rules import ShapingRules
from mqnode.spool.store import QueueStore

from .kit import T0, Transcript

RULES = """
[default]
max_connections = 20
messages_per_second = 50

[[site]]
name = "google"
mx = ["*.google.com", "*.googlemail.com"]
max_connections = 10
messages_per_minute = 600
messages_per_second = 20
connections_per_minute = 60
messages_per_connection = 100
recipients_per_transaction = 100
retry_base_s = 600
tls_required = true

[[site]]
name = "example-group"
domains = ["example.com", "*.example.net"]
messages_per_hour = 3600
"""


def test_sites_by_domain_then_mx_then_default() -> None:
    rules = ShapingRules.parse(RULES)
    google = rules.site_for("customer.test", ("alt1.aspmx.l.google.com",))
    assert google.name == "google" and google.rate_per_s == 10.0  # the strictest limit
    assert google.tls_required and google.max_connections == 10 and google.retry_base_s == 600
    assert rules.site_for("Example.COM").name == "example-group"
    assert rules.site_for("mail.example.net").name == "example-group"
    assert rules.site_for("example.net").name == "example-group"
    assert rules.site_for("notexample.net").name == "default"
    # a domain rule wins over an MX rule
    assert rules.site_for("example.com", ("aspmx.l.google.com",)).name == "example-group"
    assert rules.default.rate_per_s == 50 and rules.default.max_connections == 20
    assert ShapingRules.parse("").site_for("x.test").name == "default"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[site]]\nname = 'a'\n", "site 1 (a): needs domains or mx"),
        ("[[site]]\ndomains = ['x.test']\n", "site 1: needs a name"),
        (
            "[[site]]\nname = 'a'\ndomains = ['x.test']\nmessages_per_minute = 0\n",
            "site 1 (a): messages_per_minute must be a number above 0",
        ),
        (
            "[[site]]\nname = 'a'\ndomains = ['x.test']\n"
            "[[site]]\nname = 'b'\nmx = ['*.y.test']\nmax_connections = 'ten'\n",
            "site 2 (b): max_connections must be a whole number",
        ),
        ("[[site]]\nname = 'a'\ndomains = ['x.test']\ncolour = 1\n", "unknown key(s) colour"),
        ("[[site]]\nname = 'a'\ndomains = ['x.test']\n" * 2, "the name 'a' is used twice"),
        ("[default]\ndomains = ['x.test']\n", "[default]: unknown key(s) domains"),
        ("[default\n", "shaping: "),
    ],
)
def test_a_bad_file_is_refused_naming_the_site(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ShapingRules.parse(text)
    assert error in str(refused.value)


def test_pace_holds_the_rate_after_a_one_second_burst() -> None:
    pace = Pace(10.0)
    waits = [pace.reserve(100.0) for _ in range(30)]
    assert waits[:10] == [0.0] * 10  # a second's worth at once
    assert waits[10] == pytest.approx(0.1) and waits[29] == pytest.approx(2.0)
    later = Pace(2.0)
    assert later.reserve(0.0) == 0.0 and later.reserve(0.0) == 0.0
    assert later.reserve(0.0) == pytest.approx(0.5)
    assert later.reserve(10.0) == 0.0  # idle time is not saved up beyond the burst


def test_throttling_halves_the_rate_recovery_wins_it_back_and_repeats_suspend() -> None:
    rate = SiteRate(16.0)
    assert not rate.throttled(0.0, "421 4.7.0 slow down", 300)
    assert rate.per_s == 8.0
    for _ in range(3):
        rate.throttled(0.0, "421 4.7.0 slow down", 300)
    assert rate.per_s == 16.0 / FLOOR_DIVISOR  # no lower than the floor
    for _ in range(25):
        rate.accepted()
    assert rate.per_s == 16.0  # never above the configured rate
    for n in range(1, SUSPEND_AFTER + 1):
        suspended = rate.throttled(10.0, "421 4.7.0 too many", 300)
        assert suspended == (n == SUSPEND_AFTER)
    assert rate.suspended(309.0) and not rate.suspended(310.0)
    assert rate.why == "421 4.7.0 too many"
    unlimited = SiteRate(0.0)
    unlimited.throttled(0.0, "x", 1)
    assert unlimited.per_s == 0.0 and unlimited.pace is None


def test_rules_are_checked_when_applied(tx: Transcript, store: QueueStore) -> None:
    cmd = SetShaping(RULES, T0)
    assert decode_entry(encode_entry([cmd])) == [cmd]
    assert tx.one(cmd) == ("ok", "")
    assert store.shaping() == {"text": RULES, "at_ms": T0}
    bad = tx.one(SetShaping("[[site]]\nname = 'x'\n", T0 + 1))
    assert bad[0] == "rejected" and "site 1 (x)" in bad[1]
    assert store.shaping()["text"] == RULES  # the applied rules stay
