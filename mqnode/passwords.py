"""Salted scrypt secret hashes: `scrypt$N$r$p$SALT$KEY` (SALT and KEY in standard base64).

Made with `hashlib.scrypt(secret, salt=SALT, n=N, r=r, p=p)` and a random 16-byte
salt per secret. Checking one costs about 16 MiB and tens of milliseconds at the
default N=2**14, and compares in constant time. Used for SMTP AUTH passwords
(smtp/auth.py) and for the principals' API keys (access/principals.py).

Limits: N at most 2**20, r at most 32, p at most 16.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_N = 2**20
MAX_R = 32
MAX_P = 16


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
