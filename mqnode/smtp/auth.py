"""SMTP AUTH credentials: salted scrypt password hashes and the users file.

The users file (`smtp_users_file`) has one `USER:HASH` line per user; blank
lines and lines starting with `#` are ignored. USER is what the client sends
as its login (often an address); it may not contain `:`. HASH is

    scrypt$N$r$p$SALT$KEY      (SALT and KEY in standard base64)

made with `hashlib.scrypt(password, salt=SALT, n=N, r=r, p=p)` and a random
16-byte salt per user. Make a line with

    python -m mqnode.smtp.auth USER          # asks for the password twice

Only its owner may read the file (mode 600, like every file holding a
secret: config.read_owner_only); it is read once, at start-up.

`UserDb.verify` costs one scrypt evaluation (about 16 MiB and tens of
milliseconds at the default N=2**14) whether or not the user exists, and
compares in constant time, so neither timing nor the reply tells an attacker
which logins exist. It is CPU-bound: callers on an event loop run it in a
thread and bound how many run at once.

Limits: N at most 2**20, r at most 32, p at most 16; 100 000 users; logins
and passwords over 1 KiB never match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from mqnode.config import read_owner_only
from mqnode.errors import ConfigError

DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_USERS = 100_000
MAX_CREDENTIAL_BYTES = 1024  # longer logins or passwords never match


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse `scrypt$N$r$p$SALT$KEY`; ValueError says what is wrong."""
        parts = text.strip().split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("expected scrypt$N$r$p$SALT$KEY")
        try:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = base64.b64decode(parts[4], validate=True)
            key = base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"bad number or base64: {exc}") from exc
        if n < 2 or n > MAX_N or n & (n - 1):
            raise ValueError(f"N must be a power of two from 2 to {MAX_N}")
        if not (1 <= r <= MAX_R and 1 <= p <= MAX_P):
            raise ValueError(f"r must be 1..{MAX_R} and p 1..{MAX_P}")
        if len(salt) < 8 or not 16 <= len(key) <= 64:
            raise ValueError("salt must be at least 8 bytes and the key 16..64 bytes")
        return cls(n, r, p, salt, key)

    def format(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"scrypt${self.n}${self.r}${self.p}${salt}${key}"

    def derive(self, password: bytes) -> bytes:
        return _scrypt(password, self.salt, self.n, self.r, self.p, len(self.key))

    def matches(self, password: bytes) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def hash_password(
    password: str | bytes,
    salt: bytes | None = None,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
) -> str:
    """A `scrypt$N$r$p$SALT$KEY` string for `password` (a fresh random salt by default)."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return PasswordHash(n, r, p, salt, _scrypt(pw, salt, n, r, p, KEY_BYTES)).format()


class UserDb:
    """Login -> password hash; see the module docstring for the file format and costs."""

    def __init__(self, users: dict[str, PasswordHash]) -> None:
        if not users:
            raise ValueError("a users database needs at least one user")
        self._users = dict(users)
        # Unknown logins are checked against this, so they cost what a known one costs.
        first = next(iter(self._users.values()))
        self._decoy = PasswordHash(first.n, first.r, first.p, b"\0" * SALT_BYTES, first.key)

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, login: bytes, password: bytes) -> str | None:
        """The user name when `password` is right for `login`, else None."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        if len(login) > MAX_CREDENTIAL_BYTES or len(password) > MAX_CREDENTIAL_BYTES:
            name, password = "", b""
        entry = self._users.get(name) if name else None
        ok = (entry or self._decoy).matches(password)
        return name if ok and entry is not None else None

    @classmethod
    def parse(cls, text: str, source: str = "smtp_users_file") -> UserDb:
        users: dict[str, PasswordHash] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.rpartition(":")
            where = f"{source}: line {lineno}"
            if not sep or not name:
                raise ConfigError(f"{where}: expected USER:HASH")
            if name in users:
                raise ConfigError(f"{where}: user {name!r} appears twice")
            if len(users) >= MAX_USERS:
                raise ConfigError(f"{source}: more than {MAX_USERS} users")
            try:
                users[name] = PasswordHash.parse(hashed)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        if not users:
            raise ConfigError(f"{source}: no users in the file")
        return cls(users)

    @classmethod
    def load(cls, path: str) -> UserDb:
        """Read the users file; ConfigError if unreadable, open to others, or malformed."""
        p = Path(path)
        text = read_owner_only(p, "smtp_users_file")
        return cls.parse(text, f"smtp_users_file {p}")


def main(argv: list[str] | None = None) -> int:
    """`python -m mqnode.smtp.auth USER`: print a users-file line for USER."""
    import getpass
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" in args[0] or not args[0].strip():
        print("usage: python -m mqnode.smtp.auth USER   (USER without ':')", file=sys.stderr)
        return 2
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        print("passwords differ", file=sys.stderr)
        return 1
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    print(f"{args[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
