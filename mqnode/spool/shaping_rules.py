"""Traffic shaping rules: how fast, and over how many connections, each site gets mail.

A *site* is a set of destinations with one budget: the domains a rule names,
and every domain whose MX hosts a rule names by suffix ("MX rollup": every
domain hosted by Google shares `*.google.com`'s budget). The rules are TOML,
applied cluster-wide through the log (`mqnode shaping apply FILE`), so every
node and every new leader enforces the same ones:

    [default]                        # every destination no site matches
    max_connections = 20
    messages_per_second = 50

    [[site]]
    name = "google"
    mx = ["*.google.com", "*.googlemail.com"]
    max_connections = 10
    messages_per_minute = 600        # also _per_second, _per_hour; each is a limit
    connections_per_minute = 60
    messages_per_connection = 100
    recipients_per_transaction = 100
    retry_base_s = 600               # retry overrides for this site's deferrals
    retry_max_s = 3600
    tls_required = true

    [[site]]
    name = "example-group"
    domains = ["example.com", "*.example.net"]
    messages_per_hour = 5000

The first site whose `domains` match the recipient domain, else the first
whose `mx` match one of the destination's MX hosts, else `[default]`. A
rule's limits left out are not limits (the node's own settings apply). A
file that cannot be used is refused whole, with one line naming the rule.

The state machine checks a text with `ShapingRules.parse` before it keeps
it, so every node holds rules it can read; delivery/shaping.py enforces
them.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from typing import Any

from mqnode.errors import ConfigError

MAX_RULES_BYTES = 256 * 1024
MAX_SITES = 1000
MAX_PATTERNS = 1000
RATE_KEYS = {"messages_per_second": 1.0, "messages_per_minute": 60.0, "messages_per_hour": 3600.0}
INT_KEYS = (
    "max_connections",
    "connections_per_minute",
    "messages_per_connection",
    "recipients_per_transaction",
    "retry_base_s",
    "retry_max_s",
)
DEFAULT_SITE = "default"


@dataclass(frozen=True)
class SiteConfig:
    name: str
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()
    rate_per_s: float = 0.0  # the strictest of the messages_per_* limits; 0: none
    max_connections: int = 0
    connections_per_minute: int = 0
    messages_per_connection: int = 0
    recipients_per_transaction: int = 0
    retry_base_s: int = 0
    retry_max_s: int = 0
    tls_required: bool = False
    source: dict[str, Any] = field(default_factory=dict, compare=False)  # as written


@dataclass(frozen=True)
class ShapingRules:
    sites: tuple[SiteConfig, ...] = ()
    default: SiteConfig = SiteConfig(DEFAULT_SITE)
    text: str = ""  # the file as applied (shown by `mqnode shaping show`)

    @classmethod
    def parse(cls, text: str) -> ShapingRules:
        """The rules of a TOML text; ConfigError("shaping: site N (name): ...")."""
        if len(text.encode()) > MAX_RULES_BYTES:
            raise ConfigError(f"shaping: larger than {MAX_RULES_BYTES} bytes")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"shaping: {exc}") from exc
        unknown = set(doc) - {"default", "site"}
        if unknown:
            raise ConfigError(f"shaping: unknown key(s) {', '.join(sorted(unknown))}")
        default = _site(doc.get("default", {}), "[default]", DEFAULT_SITE, is_default=True)
        items = doc.get("site", [])
        if not isinstance(items, list) or len(items) > MAX_SITES:
            raise ConfigError(f"shaping: `site` must be a list of at most {MAX_SITES}")
        sites = []
        names = {DEFAULT_SITE}
        for n, item in enumerate(items, 1):
            name = item.get("name") if isinstance(item, dict) else None
            where = f"site {n}" + (f" ({name})" if isinstance(name, str) else "")
            site = _site(item, where, name)
            if site.name in names:
                raise ConfigError(f"shaping: {where}: the name {site.name!r} is used twice")
            names.add(site.name)
            sites.append(site)
        return cls(tuple(sites), default, text)

    def site_for(self, domain: str, mx_hosts: tuple[str, ...] = ()) -> SiteConfig:
        domain = domain.lower().rstrip(".")
        for site in self.sites:
            if any(_matches(p, domain) for p in site.domains):
                return site
        hosts = [h.lower().rstrip(".") for h in mx_hosts]
        for site in self.sites:
            if any(_matches(p, h) for p in site.mx for h in hosts):
                return site
        return self.default

    def named(self, name: str) -> SiteConfig:
        """The site called `name` (the default for a name these rules do not have)."""
        for site in self.sites:
            if site.name == name:
                return site
        return self.default

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": s.name, **s.source} for s in (*self.sites, self.default)]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) or name == pattern[2:]
    return fnmatch.fnmatchcase(name, pattern) if "*" in pattern else name == pattern


def _site(item: Any, where: str, name: Any, is_default: bool = False) -> SiteConfig:
    if not isinstance(item, dict):
        raise ConfigError(f"shaping: {where}: not a table")
    allowed = {"name", "domains", "mx", "tls_required", *RATE_KEYS, *INT_KEYS}
    if is_default:
        allowed -= {"name", "domains", "mx"}
    unknown = set(item) - allowed
    if unknown:
        raise ConfigError(f"shaping: {where}: unknown key(s) {', '.join(sorted(unknown))}")
    if not is_default and (not isinstance(name, str) or not name.strip() or len(name) > 64):
        raise ConfigError(f"shaping: {where}: needs a name (1 to 64 characters)")
    patterns: dict[str, tuple[str, ...]] = {}
    for key in ("domains", "mx"):
        value = item.get(key, [])
        if not isinstance(value, list) or len(value) > MAX_PATTERNS:
            raise ConfigError(f"shaping: {where}: {key} must be a list of names")
        for p in value:
            if not isinstance(p, str) or not p or len(p) > 255 or any(c.isspace() for c in p):
                raise ConfigError(f"shaping: {where}: {key}: {p!r} is not a name or *.suffix")
        patterns[key] = tuple(p.lower().rstrip(".") for p in value)
    if not is_default and not patterns["domains"] and not patterns["mx"]:
        raise ConfigError(f"shaping: {where}: needs domains or mx to match")
    rate = 0.0
    for key, unit_s in RATE_KEYS.items():
        if key in item:
            value = item[key]
            if not _number(value) or value <= 0:
                raise ConfigError(f"shaping: {where}: {key} must be a number above 0")
            per_s = float(value) / unit_s
            rate = per_s if rate == 0 else min(rate, per_s)
    ints: dict[str, int] = {}
    for key in INT_KEYS:
        if key in item:
            value = item[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 10**7:
                raise ConfigError(f"shaping: {where}: {key} must be a whole number above 0")
            ints[key] = value
    tls = item.get("tls_required", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"shaping: {where}: tls_required must be true or false")
    return SiteConfig(
        DEFAULT_SITE if is_default else str(name),
        patterns["domains"],
        patterns["mx"],
        rate,
        tls_required=tls,
        source={k: v for k, v in item.items() if k != "name"},
        **ints,
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
