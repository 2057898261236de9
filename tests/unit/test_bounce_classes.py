"""Bounce classification: real-world replies from the large providers' documentation
(tests/corpus/bounce_replies.toml), rule-file errors, and an operator's rules first."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.delivery.bounce_classes import (
    BounceClassifier,
    Category,
    enhanced_status,
    read_rules,
)
from mqnode.errors import ConfigError

CORPUS = tomllib.loads(
    (Path(__file__).parents[1] / "corpus" / "bounce_replies.toml").read_text(encoding="utf-8")
)["reply"]
DEFAULTS = BounceClassifier.load()


def test_the_corpus_is_big_and_broad() -> None:
    assert len(CORPUS) >= 50
    assert len({r["source"] for r in CORPUS}) >= 6
    assert {r["category"] for r in CORPUS} >= {c.value for c in Category} - {"unknown"}


@pytest.mark.parametrize("item", CORPUS, ids=[f"{r['source']}-{i}" for i, r in enumerate(CORPUS)])
def test_each_documented_reply_gets_its_category(item: dict[str, str]) -> None:
    category, rule = DEFAULTS.explain(item["text"])
    assert category == item["category"], f"{rule}: {item['text']}"


def test_fallbacks_by_class() -> None:
    assert DEFAULTS.explain("450 hold on") == (Category.TRANSIENT, "a 4xx no rule matched")
    assert DEFAULTS.explain("550 no") == (Category.UNKNOWN, "no rule matched")
    assert DEFAULTS.classify("") == Category.UNKNOWN


def test_enhanced_status() -> None:
    assert enhanced_status("550 5.1.1 x") == ("5", "1", "1")
    assert enhanced_status("550-5.7.026 x") == ("5", "7", "26")
    assert enhanced_status("4.4.7 expired") == ("4", "4", "7")
    assert enhanced_status("550 4.1.1 the class contradicts the code") is None
    assert enhanced_status("550 user unknown") is None


def test_an_operators_rules_come_first_and_may_name_the_host(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\ncategory = "rate-limited"\nreply = "^421 .*try again later"\n'
        'host = ".mail.example.net"\n\n'
        '[[rule]]\ncategory = "transient"\nstatus = ["5.7.1", "5.7.9"]\n'
        'reply = "blocklist"\n'
    )
    mine = BounceClassifier.load(str(rules))
    text = "421 4.7.0 [CS04] Please try again later."
    assert mine.classify(text, "mx1.mail.example.net[192.0.2.7]") == Category.RATE_LIMITED
    assert mine.classify(text, "mail.example.net") == Category.TRANSIENT  # not a subdomain
    assert mine.explain("554 5.7.1 on our blocklist")[1] == "rules.toml rule 2"
    assert mine.classify("554 5.7.2 on our blocklist") == Category.POLICY  # the defaults'


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[rule]]\ncategory = "nice"\nreply = "x"\n', "rule 1: category 'nice' is not one of"),
        ('[[rule]]\ncategory = "policy"\n', "rule 1: needs a reply, status or host"),
        ('[[rule]]\ncategory = "policy"\nreply = "("\n', "rule 1: reply pattern"),
        ('[[rule]]\ncategory = "policy"\nstatus = "5.1"\n', "rule 1: status '5.1' is not like"),
        ('[[rule]]\ncategory = "policy"\nreply = "x"\ncolour = 1\n', "unknown key(s) colour"),
        ("[[rule]\n", "rules.toml"),
        ('rules = "x"\n', "unknown key(s) rules"),
    ],
)
def test_a_bad_rules_file_is_refused_naming_the_rule(tmp_path: Path, text: str, error: str) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(text)
    with pytest.raises(ConfigError, match="bounce rules") as refused:
        read_rules(rules)
    assert error in str(refused.value)
    with pytest.raises(ConfigError, match=r"no-such\.toml"):
        BounceClassifier.load(str(tmp_path / "no-such.toml"))


def test_the_shipped_rules_use_every_category() -> None:
    used = Counter(r.category for r in DEFAULTS.rules)
    assert set(used) == set(Category) - {Category.UNKNOWN}


@given(st.text(max_size=300), st.text(max_size=60))
def test_any_reply_gets_a_category(reply: str, host: str) -> None:
    assert DEFAULTS.classify(reply, host) in set(Category)
