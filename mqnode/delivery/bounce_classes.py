"""BounceClassifier: what a delivery reply means, as one of a few categories.

Receivers say the same thing in many ways: "550 5.1.1 user unknown",
"550 5.5.0 Requested action not taken: mailbox unavailable", "554 delivery
error: dd This user doesn't have a yahoo.com account". An operator (and
suppression, and shaping) needs to know which replies mean "this address
will never work", "slow down" or "your IP is blocked", whatever the words.

Rules map a reply (its text, its enhanced status code, the host that gave
it) to a `Category`; the first that matches wins. The defaults ship in
`bounce_rules.toml` next to this module, which documents the format; an
operator's file in the same format (`--bounce-rules-file`) goes first. A
reply no rule matches is `transient` for a 4xx and `unknown` otherwise.

Pure: the same rules give every reply the same category on every node.
Bounded: replies are read up to `MAX_REPLY_CHARS`, patterns are compiled
once, and a rules file has at most `MAX_RULES` rules of `MAX_PATTERN_CHARS`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from mqnode.errors import ConfigError

DEFAULT_RULES = Path(__file__).with_name("bounce_rules.toml")
MAX_RULES = 2000
MAX_PATTERN_CHARS = 2000
MAX_REPLY_CHARS = 1000
MAX_FILE_BYTES = 1 << 20


class Category(StrEnum):
    INVALID_RECIPIENT = "invalid-recipient"  # the address does not exist
    BAD_DOMAIN = "bad-domain"  # the domain does not exist or takes no mail
    MAILBOX_FULL = "mailbox-full"
    INACTIVE_MAILBOX = "inactive-mailbox"  # exists, but disabled or abandoned
    CONTENT = "content"  # this message: spam, virus, attachment
    POLICY = "policy"  # the sender: blocklisted IP, reputation, relaying denied
    RATE_LIMITED = "rate-limited"  # slow down: too many messages or connections
    AUTHENTICATION = "authentication"  # SPF, DKIM, DMARC; a relay login
    TLS = "tls"
    DNS = "dns"  # a lookup of ours failed (for now)
    PROTOCOL = "protocol"  # an SMTP feature or syntax the two sides disagree on
    TOO_LARGE = "too-large"
    TRANSIENT = "transient"  # a temporary failure with no more said
    UNKNOWN = "unknown"


# The categories that say the address will not work: what suppression may add.
HARD = frozenset({Category.INVALID_RECIPIENT, Category.BAD_DOMAIN, Category.INACTIVE_MAILBOX})

_WHITESPACE = re.compile(r"\s+")
_STATUS = re.compile(r"(?:(\d)\d\d[ -])?([245])\.(\d{1,3})\.(\d{1,3})\b")
_STATUS_PATTERN = re.compile(r"^([245x])\.(\d{1,3}|x)\.(\d{1,3}|x)$")


@dataclass(frozen=True)
class Rule:
    category: Category
    reply: re.Pattern[str] | None = None
    statuses: tuple[tuple[str, str, str], ...] = ()  # ("5", "1", "x"), "x" for any
    host: str = ""  # a host name, or a suffix starting with "."
    where: str = ""  # "FILE rule N", for errors and `explain`

    def matches(self, text: str, status: tuple[str, str, str] | None, host: str) -> bool:
        if self.host and not _host_matches(self.host, host):
            return False
        if self.statuses and not (
            status is not None and any(_status_matches(p, status) for p in self.statuses)
        ):
            return False
        return self.reply is None or self.reply.search(text) is not None


def _host_matches(rule: str, host: str) -> bool:
    name = host.split("[", 1)[0].strip().rstrip(".").lower()  # "mx.x.net[192.0.2.1]"
    return name.endswith(rule) if rule.startswith(".") else name == rule


def _status_matches(pattern: tuple[str, str, str], status: tuple[str, str, str]) -> bool:
    return all(p in ("x", s) for p, s in zip(pattern, status, strict=True))


def enhanced_status(reply: str) -> tuple[str, str, str] | None:
    """("5", "1", "1") from "550 5.1.1 ..." or from our own "5.1.1 ..."; None without one
    (or with one whose class contradicts the basic code)."""
    found = _STATUS.match(reply.lstrip())
    if found is None or found.group(1) not in (None, found.group(2)):
        return None
    return (found.group(2), str(int(found.group(3))), str(int(found.group(4))))


class BounceClassifier:
    """Rules in order (module docstring); `classify` is what the rest of mqnode calls."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def load(cls, operator_file: str = "") -> BounceClassifier:
        """The operator's rules (if any) before the defaults; ConfigError naming the file and
        rule for a file that cannot be used."""
        rules = read_rules(Path(operator_file)) if operator_file else []
        return cls([*rules, *read_rules(DEFAULT_RULES)])

    def classify(self, reply: str, host: str = "") -> Category:
        return self.explain(reply, host)[0]

    def explain(self, reply: str, host: str = "") -> tuple[Category, str]:
        """(the category, which rule gave it: "FILE rule N", or the fallback's name)."""
        text = _WHITESPACE.sub(" ", reply[:MAX_REPLY_CHARS]).strip()
        status = enhanced_status(text)
        for rule in self.rules:
            if rule.matches(text, status, host):
                return rule.category, rule.where
        if text[:1] == "4" or (status is not None and status[0] == "4"):
            return Category.TRANSIENT, "a 4xx no rule matched"
        return Category.UNKNOWN, "no rule matched"


def read_rules(path: Path) -> list[Rule]:
    """The rules of one file; ConfigError naming it (and the rule) when it cannot be used."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"bounce rules {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"bounce rules {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"bounce rules {path}: {exc}") from exc
    unknown = set(doc) - {"rule"}
    if unknown:
        raise ConfigError(f"bounce rules {path}: unknown key(s) {', '.join(sorted(unknown))}")
    items = doc.get("rule", [])
    if not isinstance(items, list) or len(items) > MAX_RULES:
        raise ConfigError(f"bounce rules {path}: `rule` must be a list of at most {MAX_RULES}")
    rules = []
    for n, item in enumerate(items, 1):
        try:
            rules.append(_rule(item, f"rule {n}", path.name))
        except ConfigError as exc:
            raise ConfigError(f"bounce rules {path}: {exc}") from None
    return rules


def _rule(item: Any, where: str, file: str) -> Rule:
    """One rule; ConfigError("rule N: what is wrong")."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: not a table")
    unknown = set(item) - {"category", "reply", "status", "host"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        category = Category(str(item.get("category")))
    except ValueError:
        names = ", ".join(c.value for c in Category)
        raise ConfigError(
            f"{where}: category {item.get('category')!r} is not one of {names}"
        ) from None
    if not any(k in item for k in ("reply", "status", "host")):
        raise ConfigError(f"{where}: needs a reply, status or host to match")
    reply = None
    if "reply" in item:
        pattern = item["reply"]
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"{where}: reply must be a pattern of 1 to {MAX_PATTERN_CHARS} chars")
        try:
            reply = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{where}: reply pattern: {exc}") from exc
    statuses = item.get("status", [])
    statuses = [statuses] if isinstance(statuses, str) else statuses
    parsed: list[tuple[str, str, str]] = []
    for s in statuses if isinstance(statuses, list) else [None]:
        found = _STATUS_PATTERN.match(s) if isinstance(s, str) else None
        if found is None:
            raise ConfigError(f"{where}: status {s!r} is not like 5.1.1 or x.2.x")
        klass, subject, detail = (g if g == "x" else str(int(g)) for g in found.groups())
        parsed.append((klass, subject, detail))
    host = item.get("host", "")
    if not isinstance(host, str) or len(host) > 255 or any(c.isspace() for c in host):
        raise ConfigError(f"{where}: host must be a host name or .suffix")
    return Rule(category, reply, tuple(parsed), host.lower().rstrip("."), f"{file} {where}")
