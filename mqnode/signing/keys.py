"""DKIM keys: loading and checking them, choosing one for a message, making new ones.

A key is named by `DOMAIN:SELECTOR:KEY_FILE` (`dkim_keys`). The file holds a
PEM private key, RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8, RFC 8463), and
must be readable by its owner alone like every secret mqnode reads. An RSA
key under 1024 bits is refused, one under 2048 bits is loaded with a warning
(RFC 8301: 1024 is the least a verifier accepts, 2048 what signers should
use). Any problem is a `ConfigError` naming the file.

A message is signed for the domain of its `From:` address: the exact domain,
then its parent domains when `dkim_parent_domains` is on, then
`dkim_default_domain` (a sending service's own domain) when set. Every key of
the chosen domain signs, so an RSA and an Ed25519 key give two signatures.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mqnode.config import read_owner_only
from mqnode.errors import ConfigError

log = logging.getLogger(__name__)

RSA = "rsa"
ED25519 = "ed25519"
MIN_RSA_BITS = 1024
GOOD_RSA_BITS = 2048
DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_DOMAIN_CHARS = 253
MAX_SELECTOR_CHARS = 63


@dataclass(frozen=True)
class DkimKey:
    domain: str  # lower case, no trailing dot
    selector: str
    algorithm: str  # RSA or ED25519
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: str

    @property
    def public_b64(self) -> str:
        """The `p=` value of the DNS record: DER SubjectPublicKeyInfo (RSA), raw key (Ed25519)."""
        pub = self.private.public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = pub.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_record(self) -> str:
        """The TXT record to publish at `record_name`."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64}"

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 digest, as `a=rsa-sha256` / `a=ed25519-sha256` want."""
        key = self.private
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(digest)  # RFC 8463: PureEdDSA over the SHA-256 hash
        return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def zone_lines(key: DkimKey) -> str:
    """The record as a zone-file line, split into strings of at most 255 bytes."""
    text = key.txt_record()
    parts = " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))
    return f"{key.record_name}. IN TXT ( {parts} )"


def _check_name(value: str, what: str, limit: int, spec: str) -> str:
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    ok = 0 < len(name) <= limit and all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
        for label in labels
    )
    if not ok or not name.isascii():
        raise ConfigError(f"dkim_keys: {spec!r}: {what} {value!r} is not a DNS name")
    return name


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`DOMAIN:SELECTOR:KEY_FILE` as (domain, selector, path); ConfigError if malformed."""
    domain, sep1, rest = spec.partition(":")
    selector, sep2, path = rest.partition(":")
    if not (sep1 and sep2 and path.strip()):
        raise ConfigError(f"dkim_keys: {spec!r} is not DOMAIN:SELECTOR:KEY_FILE")
    return (
        _check_name(domain, "domain", MAX_DOMAIN_CHARS, spec),
        _check_name(selector, "selector", MAX_SELECTOR_CHARS, spec),
        path.strip(),
    )


def load_key(domain: str, selector: str, path: str) -> DkimKey:
    """Read and check one key file (module docstring)."""
    pem = read_owner_only(Path(path), "dkim_keys")
    try:
        private = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"dkim_keys: {path} is not an unencrypted PEM private key") from exc
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, ED25519, private, path)
    if not isinstance(private, rsa.RSAPrivateKey):
        raise ConfigError(f"dkim_keys: {path}: only RSA and Ed25519 keys sign DKIM")
    bits = private.key_size
    if bits < MIN_RSA_BITS:
        raise ConfigError(f"dkim_keys: {path}: a {bits}-bit RSA key; at least {MIN_RSA_BITS}")
    if bits < GOOD_RSA_BITS:
        log.warning("dkim: %s is a %d-bit RSA key; use %d bits", path, bits, GOOD_RSA_BITS)
    return DkimKey(domain, selector, RSA, private, path)


class KeySet:
    """The keys a node signs with, by domain (module docstring for the choice)."""

    def __init__(
        self, keys: Iterable[DkimKey], parent_domains: bool = False, default_domain: str = ""
    ) -> None:
        self.keys = tuple(keys)
        self._by_domain: dict[str, list[DkimKey]] = {}
        for key in self.keys:
            mine = self._by_domain.setdefault(key.domain, [])
            if any(k.selector == key.selector for k in mine):
                raise ConfigError(f"dkim_keys: {key.domain}:{key.selector} given twice")
            mine.append(key)
        self._parents = parent_domains
        self._default = default_domain.lower().rstrip(".")
        if self._default and self._default not in self._by_domain:
            raise ConfigError(f"dkim_default_domain: no key in dkim_keys for {self._default}")

    @classmethod
    def load(
        cls, specs: Iterable[str], parent_domains: bool = False, default_domain: str = ""
    ) -> KeySet:
        return cls((load_key(*parse_spec(spec)) for spec in specs), parent_domains, default_domain)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def for_domain(self, domain: str) -> list[DkimKey]:
        """The keys that sign mail from `domain` (empty: mail from it goes unsigned)."""
        name = domain.lower().rstrip(".")
        if name in self._by_domain:
            return self._by_domain[name]
        if self._parents:
            labels = name.split(".")
            for i in range(1, len(labels) - 1):
                parent = ".".join(labels[i:])
                if parent in self._by_domain:
                    return self._by_domain[parent]
        return self._by_domain.get(self._default, [])

    def fingerprint(self) -> str:
        """A short digest of which keys sign what: equal on nodes that sign alike."""
        h = hashlib.sha256()
        for key in sorted(self.keys, key=lambda k: (k.domain, k.selector)):
            h.update(f"{key.domain}:{key.selector}:{key.public_b64}\n".encode())
        return h.hexdigest()[:16] if self.keys else ""


def keygen(domain: str, selector: str, algorithm: str, bits: int, out_dir: Path) -> DkimKey:
    """Make a key, write it to OUT_DIR/DOMAIN.SELECTOR.key (mode 600, never overwritten)."""
    domain = _check_name(domain, "domain", MAX_DOMAIN_CHARS, domain)
    selector = _check_name(selector, "selector", MAX_SELECTOR_CHARS, selector)
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == RSA:
        if not GOOD_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ConfigError(f"--bits: {GOOD_RSA_BITS} to {MAX_RSA_BITS}")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        raise ConfigError(f"--algorithm: {RSA} or {ED25519}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{domain}.{selector}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"--out: {path} exists; choose another selector") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return DkimKey(domain, selector, algorithm, private, str(path))


HEADER_SCAN_BYTES = 256 * 1024  # where signatures are looked for (`queue show`, queue events)
_SIGNATURE = re.compile(rb"(?im)^DKIM-Signature:((?:[^\r\n]*\r?\n[ \t])*[^\r\n]*)")
_D_TAG = re.compile(rb"(?:^|;)\s*d\s*=\s*([^;\s]+)")


def signing_domains(message: bytes) -> list[str]:
    """The d= of every DKIM-Signature in the message's header, top first.

    Searched in place up to the blank line (the node asks for every message a worker
    submits, for its queue event): no copy of the header or the body."""
    end = message.find(b"\r\n\r\n")
    out = []
    for match in _SIGNATURE.finditer(message, 0, len(message) if end < 0 else end):
        d = _D_TAG.search(re.sub(rb"\r?\n[ \t]", b" ", match.group(1)))
        if d:
            out.append(d.group(1).decode("ascii", "replace").lower())
    return out
