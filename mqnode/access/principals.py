"""Principals: who may do what over HTTP (the admin endpoint and the injection API).

The principals file (`principals_file`, TOML, mode 600 like every file holding a
secret) lists them:

    [[principal]]
    name = "newsletter"                # letters, digits, '-', '_'; 1..64
    key = "scrypt$16384$8$1$SALT$KEY"  # the hashed secret (mqnode/passwords.py)
    roles = ["submit"]                 # submit | view | operate | admin
    api_rate_per_min = 6000            # optional: messages a minute over the API (default)

A client presents `Authorization: Bearer NAME.SECRET` (what `mqnode principals
add` prints once). Roles:

    submit   inject mail over the HTTP API
    view     status, queue lists and headers, metrics, suppression and audit lists
    operate  view, and hold, release, retry, suppress, shaping show, compaction
    admin    everything: delete, bounce, bodies, membership, shaping apply, reloads

The node's admin token (`admin_token_file`) stays valid as the principal
`admin-token` with the role admin, and no API rate limit.

Costs: the first check of a key is one scrypt evaluation (tens of milliseconds,
in a thread, at most CHECK_SLOTS at once); a key that passed is remembered by its
sha256 (at most CACHE_MAX of them) until the file is read again, so requests
after the first cost a hash. A name that is not in the file is checked against
a decoy, so timing does not tell which names exist. A reload (SIGHUP) reads
the file whole or keeps the principals as they were.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqnode.config import read_owner_only
from mqnode.errors import ConfigError
from mqnode.passwords import SALT_BYTES, PasswordHash, hash_password

ROLES = ("submit", "view", "operate", "admin")
# What each role grants, itself included.
GRANTS: dict[str, frozenset[str]] = {
    "submit": frozenset({"submit"}),
    "view": frozenset({"view"}),
    "operate": frozenset({"operate", "view"}),
    "admin": frozenset(ROLES),
}
ADMIN_TOKEN_PRINCIPAL = "admin-token"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PRINCIPALS = 10_000
MAX_TOKEN_BYTES = 1024
CACHE_MAX = 10_000
CHECK_SLOTS = 2  # scrypt checks running at once
DEFAULT_API_RATE_PER_MIN = 6000


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    api_rate_per_min: int = DEFAULT_API_RATE_PER_MIN  # 0: no limit (the admin token)

    def may(self, role: str) -> bool:
        return any(role in GRANTS[r] for r in self.roles)


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    key: PasswordHash


class Principals:
    """The principals of the moment: parse, check a bearer token, remember good keys."""

    def __init__(self, entries: dict[str, _Entry], admin_token: str, source: str = "") -> None:
        self._entries = entries
        self._admin_token = admin_token.encode()
        self.source = source  # the file they came from ("" : the admin token alone)
        self._cache: dict[bytes, Principal] = {}
        self._slots = asyncio.Semaphore(CHECK_SLOTS)
        first = next(iter(entries.values()), None)
        proto = first.key if first else PasswordHash.parse(hash_password("decoy", n=2**4))
        self._decoy = PasswordHash(proto.n, proto.r, proto.p, b"\0" * SALT_BYTES, proto.key)

    def __len__(self) -> int:
        return len(self._entries)

    def with_admin_token(self, admin_token: str) -> Principals:
        return Principals(self._entries, admin_token, self.source)

    def names(self) -> list[str]:
        return sorted(self._entries)

    @classmethod
    def load(cls, path: str, admin_token: str) -> Principals:
        """Read the principals file (ConfigError naming the entry); "" : the token alone."""
        if not path:
            return cls({}, admin_token)
        text = read_owner_only(Path(path), "principals_file")
        return cls(parse(text, f"principals_file {path}"), admin_token, path)

    async def authenticate(self, authorization: str) -> Principal | None:
        """The principal an `Authorization` header value names, or None."""
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_BYTES:
            return None
        raw = token.encode("utf-8", "surrogateescape")
        if self._admin_token and hmac.compare_digest(raw, self._admin_token):
            return Principal(ADMIN_TOKEN_PRINCIPAL, frozenset({"admin"}), api_rate_per_min=0)
        digest = hashlib.sha256(raw).digest()
        known = self._cache.get(digest)
        if known is not None:
            return known
        name, dot, secret = token.partition(".")
        entry = self._entries.get(name) if dot else None
        check = (entry.key if entry else self._decoy).matches
        async with self._slots:
            ok = await asyncio.to_thread(check, secret.encode("utf-8", "surrogateescape"))
        if not ok or entry is None:
            return None
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = entry.principal
        return entry.principal


def submit_keys(path: str) -> dict[str, PasswordHash]:
    """Name -> key of the principals that may submit: SMTP AUTH takes them as logins
    (the name and the SECRET part of the token as the password)."""
    if not path:
        return {}
    entries = parse(read_owner_only(Path(path), "principals_file"), f"principals_file {path}")
    return {name: e.key for name, e in entries.items() if e.principal.may("submit")}


def parse(text: str, source: str = "principals_file") -> dict[str, _Entry]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not TOML: {exc}") from exc
    unknown = set(doc) - {"principal"}
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"{source}: unknown table {first!r} (expected [[principal]])")
    items = doc.get("principal", [])
    if not isinstance(items, list):
        raise ConfigError(f"{source}: 'principal' must be an array of tables ([[principal]])")
    if len(items) > MAX_PRINCIPALS:
        raise ConfigError(f"{source}: more than {MAX_PRINCIPALS} principals")
    out: dict[str, _Entry] = {}
    for i, item in enumerate(items, 1):
        entry = _entry(item, f"{source}: principal {i}")
        if entry.principal.name in out:
            raise ConfigError(f"{source}: principal {entry.principal.name!r} appears twice")
        if entry.principal.name == ADMIN_TOKEN_PRINCIPAL:
            raise ConfigError(f"{source}: the name {ADMIN_TOKEN_PRINCIPAL!r} is the admin token's")
        out[entry.principal.name] = entry
    return out


def _entry(item: Any, where: str) -> _Entry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(item) - {"name", "key", "roles", "api_rate_per_min"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = item.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be 1..64 letters, digits, '-' or '_'")
    where = f"{where} ({name})"
    roles = item.get("roles")
    if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
        raise ConfigError(f"{where}: roles must be a non-empty list of {', '.join(ROLES)}")
    try:
        key = PasswordHash.parse(str(item.get("key", "")))
    except ValueError as exc:
        raise ConfigError(f"{where}: key: {exc}") from exc
    rate = item.get("api_rate_per_min", DEFAULT_API_RATE_PER_MIN)
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= 10_000_000:
        raise ConfigError(f"{where}: api_rate_per_min must be a whole number from 1")
    return _Entry(Principal(name, frozenset(roles), rate), key)


def new_principal(name: str, roles: list[str]) -> tuple[str, str]:
    """A fresh secret: (the token to give the client, the file entry to add)."""
    if not NAME_RE.match(name):
        raise ConfigError("principal name must be 1..64 letters, digits, '-' or '_'")
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad:
        raise ConfigError(f"roles must be some of {', '.join(ROLES)}")
    secret = secrets.token_urlsafe(32)
    entry = (
        f'[[principal]]\nname = "{name}"\nkey = "{hash_password(secret)}"\n'
        f"roles = [{', '.join(repr(r).replace(chr(39), chr(34)) for r in roles)}]\n"
    )
    return f"{name}.{secret}", entry
