"""The suppression list's entries: addresses and domains mail must not go to.

An entry names an address ("bob@example.org") or a whole domain
("@example.org"), for every sender (scope "") or for one sending domain
(scope "shop.example"). It says why (reason), where it came from (source:
manual, bounce, import), when it was made and when it expires (0: never).
The list is replicated through the log (`Suppress` commands), so every node
answers the same; SMTP ingress refuses a suppressed recipient at RCPT TO, and
the dispatcher checks again before delivering mail queued before the entry.

Targets are normalised before submit, the same on every node: the domain in
its ASCII (IDNA) form and lower case, the local part lower case too (the
large mailbox providers treat it so, and an entry that misses because of case
would mail an address that asked not to be).

A lookup reads at most four keys: the address and its domain, globally and for
the sender's domain. An expired entry counts as absent; the state machine
removes expired entries a few at a time as it applies new mail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mqnode.spool.addresses import ascii_domain

SOURCES = ("manual", "bounce", "import")
MAX_TARGET_CHARS = 320  # RFC 5321: 64 local part + @ + 255 domain
MAX_REASON_CHARS = 300
MAX_SCOPE_CHARS = 255
ENTRIES_PER_COMMAND = 200  # ~70 KiB at the longest fields: keep entries small


class SuppressionError(ValueError):
    """An entry that cannot be stored (a bad address, domain, scope or source)."""


@dataclass(frozen=True)
class Entry:
    target: str
    scope: str = ""
    reason: str = ""
    source: str = "manual"
    created_ms: int = 0
    expires_ms: int = 0  # 0: never

    def as_command_item(self) -> tuple[str, str, str, str, int, int]:
        return (
            self.target,
            self.scope,
            self.reason,
            self.source,
            self.created_ms,
            self.expires_ms,
        )

    def to_record(self) -> list[Any]:
        return [self.reason, self.source, self.created_ms, self.expires_ms]

    @classmethod
    def from_record(cls, target: str, scope: str, rec: list[Any]) -> Entry:
        return cls(target, scope, str(rec[0]), str(rec[1]), int(rec[2]), int(rec[3]))

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires_ms <= now_ms

    def why(self) -> str:
        """For a refusal's reply: what put the recipient on the list, short and ASCII."""
        text = self.source + (f": {self.reason}" if self.reason else "")
        text = f"for {self.scope}, {text}" if self.scope else text
        return "".join(c if " " <= c <= "~" else "?" for c in text[:120])

    def view(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scope": self.scope,
            "reason": self.reason,
            "source": self.source,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
        }


def normalise_target(text: str) -> str:
    """ "bob@Example.ORG" -> "bob@example.org"; "example.org" or "@example.org" -> the
    domain entry "@example.org". SuppressionError for anything else."""
    value = text.strip().strip("<>").strip()
    if not value or len(value) > MAX_TARGET_CHARS or any(c.isspace() for c in value):
        raise SuppressionError(f"not an address or a domain: {text!r}")
    local, at, domain = value.rpartition("@")
    if not at:
        local, domain = "", value
    if at and not local and not value.startswith("@"):
        raise SuppressionError(f"not an address or a domain: {text!r}")
    try:
        domain = ascii_domain(domain).lower()
    except ValueError as exc:
        raise SuppressionError(f"{text!r}: {exc}") from None
    if "." not in domain.strip("."):
        raise SuppressionError(f"{text!r}: not a domain name")
    if local and ("\0" in local or len(local) > 64):
        raise SuppressionError(f"{text!r}: bad local part")
    return f"{local.lower()}@{domain}"


def normalise_scope(text: str) -> str:
    """ "" (every sender) or a sending domain, as normalise_target writes domains."""
    if not text.strip():
        return ""
    if len(text) > MAX_SCOPE_CHARS:
        raise SuppressionError("scope: too long")
    return normalise_target(text.lstrip("@")).lstrip("@")


def make_entry(
    target: str,
    scope: str = "",
    reason: str = "",
    source: str = "manual",
    created_ms: int = 0,
    expires_ms: int = 0,
) -> Entry:
    """A checked, normalised entry (SuppressionError otherwise)."""
    if source not in SOURCES:
        raise SuppressionError(f"source must be one of {', '.join(SOURCES)}")
    if created_ms < 0 or expires_ms < 0:
        raise SuppressionError("negative time")
    reason = " ".join(reason.split())[:MAX_REASON_CHARS]
    return Entry(
        normalise_target(target), normalise_scope(scope), reason, source, created_ms, expires_ms
    )


def invalid_item(item: tuple[str, str, str, str, int, int]) -> str | None:
    """Why a replicated entry cannot be stored (what normalisation would have refused)."""
    target, scope, reason, source, created, expires = item
    try:
        if normalise_target(target) != target or normalise_scope(scope) != scope:
            return "entry not normalised"
    except SuppressionError as exc:
        return str(exc)
    if source not in SOURCES or len(reason) > MAX_REASON_CHARS or created < 0 or expires < 0:
        return "bad reason, source or time"
    return None


def key(scope: str, target: str) -> bytes:
    return f"{scope}\0{target}".encode()


def split_key(raw: bytes) -> tuple[str, str]:
    scope, _, target = raw.decode().partition("\0")
    return scope, target


def lookup_keys(recipient: str, sender_domain: str) -> list[bytes]:
    """The keys that would suppress mail from `sender_domain` to `recipient`, most
    specific first. [] for a recipient that is not an address (nothing to look up)."""
    try:
        target = normalise_target(recipient)
    except SuppressionError:
        return []
    domain_entry = "@" + target.rpartition("@")[2]
    keys = [key("", target), key("", domain_entry)]
    if sender_domain:
        try:
            scope = normalise_scope(sender_domain)
        except SuppressionError:
            scope = ""
        if scope:
            keys = [key(scope, target), key(scope, domain_entry), *keys]
    return keys


def domain_of(address: str) -> str:
    """The domain of a sender address ("" for the null sender or no domain)."""
    return address.strip().strip("<>").rpartition("@")[2]
