"""SMTP AUTH credentials: salted scrypt password hashes and the users file.

The users file (`smtp_users_file`) has one `USER:HASH` line per user; blank
lines and lines starting with `#` are ignored. USER is what the client sends
as its login (often an address); it may not contain `:`. HASH is

    scrypt$N$r$p$SALT$KEY      (SALT and KEY in standard base64)

made with `hashlib.scrypt(password, salt=SALT, n=N, r=r, p=p)` and a random
16-byte salt per user. Make a line with

    python -m mqnode.smtp.auth USER          # asks for the password twice

Only its owner may read the file (mode 600, like every file holding a
secret: config.read_owner_only); it is read once, at start-up. With TLS, the
principals that may submit (`principals_file`, access/principals.py) log in
too: their name, and the SECRET part of their NAME.SECRET token (read at
start-up, as this file).

`UserDb.verify` costs one scrypt evaluation (about 16 MiB and tens of
milliseconds at the default N=2**14) whether or not the user exists, and
compares in constant time, so neither timing nor the reply tells an attacker
which logins exist. It is CPU-bound: callers on an event loop run it in a
thread and bound how many run at once.

Limits: N at most 2**20, r at most 32, p at most 16; 100 000 users; logins
and passwords over 1 KiB never match.
"""

from __future__ import annotations

from pathlib import Path

from mqnode.access.principals import submit_keys
from mqnode.config import read_owner_only
from mqnode.errors import ConfigError
from mqnode.passwords import SALT_BYTES, PasswordHash, hash_password

__all__ = ["PasswordHash", "UserDb", "hash_password"]

MAX_USERS = 100_000
MAX_CREDENTIAL_BYTES = 1024  # longer logins or passwords never match


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
    def for_node(cls, users_file: str, principals_file: str) -> UserDb | None:
        """The users file's logins and the principals that may submit (their name and
        secret); None when there are none. A name in both is refused."""
        users = dict(cls.load(users_file)._users) if users_file else {}
        for name, key in submit_keys(principals_file).items():
            if name in users:
                raise ConfigError(f"principals_file: {name!r} is also a login in smtp_users_file")
            users[name] = key
        return cls(users) if users else None

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
