"""DkimSigner: DKIM-Signature headers (RFC 6376, RFC 8463) for a message at ingress.

The only module that imports dkimpy (pinned exactly: it reaches into its
`DKIM` class). dkimpy does the parts that are easy to get subtly wrong:
parsing the header, relaxed canonicalization of header and body, choosing
and hashing the signed fields, folding the header. Its RSA arithmetic is pure
Python (~7 ms per signature at 2048 bits), so the signing itself is handed to
OpenSSL through `cryptography` (`DkimKey.sign_digest`, ~0.3 ms): dkimpy's
`RSASSA_PKCS1_v1_5_sign` is replaced for our key objects only, and its
Ed25519 path is given an object with the `sign` it calls, so no PyNaCl is
needed to sign.

Why a subclass: `t=` must be the receive time carried in the `Enqueue`
command (dkimpy reads the clock), and `x=` is configurable (dkimpy has none).
The signed bytes are what is replicated, so every node holds, and delivers,
the same signature; a retried submission is deduplicated before it is signed
again.

Defaults as OpenDKIM's: relaxed/relaxed, the header fields of
`DEFAULT_HEADERS` that the message has, and `From` signed once more than it
occurs, so that no From can be added. Signatures the message already
carries are kept; ours go on top.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
from email.utils import getaddresses
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from mqnode.config import DKIM_HEADERS, NodeConfig
from mqnode.errors import MqnodeError
from mqnode.signing.keys import ED25519, DkimKey, KeySet
from mqnode.spool.addresses import ascii_domain

log = logging.getLogger(__name__)

DEFAULT_HEADERS = DKIM_HEADERS
_RELAXED = b"relaxed/relaxed"
_ALGORITHM = {ED25519: b"ed25519-sha256"}  # else rsa-sha256


class SigningError(MqnodeError):
    """This message could not be signed (the caller refuses it with a 451)."""


class _Ed25519:
    """What dkimpy's Ed25519 path calls: `sign(digest).signature`."""

    def __init__(self, key: DkimKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> Any:
        return _Signature(self._key.sign_digest(digest))


class _Signature:
    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _Rsa:
    """Our RSA key, as dkimpy's `RSASSA_PKCS1_v1_5_sign` receives it (see `_rsa_sign`)."""

    def __init__(self, key: DkimKey) -> None:
        self.key = key


_DKIMPY_RSA_SIGN = dkim.RSASSA_PKCS1_v1_5_sign


def _rsa_sign(hash_obj: Any, key: Any) -> bytes:
    if isinstance(key, _Rsa):
        return key.key.sign_digest(hash_obj.digest())
    return bytes(_DKIMPY_RSA_SIGN(hash_obj, key))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign  # OpenSSL's arithmetic for our keys (docstring)


class _Message(dkim.DKIM):  # type: ignore[misc]
    def sign_with(
        self, key: DkimKey, at_s: int, expire_s: int, headers: tuple[bytes, ...]
    ) -> bytes:
        """One DKIM-Signature header (with its CRLF) by `key`; as dkimpy's `sign`, with t= and
        x= given."""
        algorithm = _ALGORITHM.get(key.algorithm, b"rsa-sha256")
        self.signature_algorithm = algorithm
        self.hasher = dkim.HASH_ALGORITHMS[algorithm]
        policy = CanonicalizationPolicy.from_c_value(_RELAXED)
        body_hash: bytes | None = getattr(self, "_mq_body_hash", None)
        if body_hash is None:  # both algorithms hash the body with SHA-256: once per message
            body = policy.canonicalize_body(self.body)
            body_hash = self._mq_body_hash = base64.b64encode(self.hasher(body).digest())
        present = {name.lower() for name, _ in self.headers}
        include = (*(h for h in headers if h in present), b"from")
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", _RELAXED),
            (b"d", key.domain.encode("ascii")),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(at_s).encode("ascii")),
            *([(b"x", str(at_s + expire_s).encode("ascii"))] if expire_s > 0 else []),
            (b"h", b":".join(include)),
            (b"bh", body_hash),
            (b"b", b"0" * 60),  # dkimpy folds b= onto its own line, then fills it in
        ]
        primitive: Any = _Ed25519(key) if key.algorithm == ED25519 else _Rsa(key)
        value = self.gen_header(fields, include, policy, b"DKIM-Signature", primitive)
        return b"DKIM-Signature: " + bytes(value)

    def from_domain(self) -> str | None:
        """The domain of the (first) From: address, in its ASCII form; None without one."""
        for name, value in self.headers:
            if name.lower() == b"from":
                return from_domain(value)
        return None


# `addr@domain` or `Plain Name <addr@domain>`: most From fields, read without the
# email package's full parser (a tenth of a signature's Python time); anything
# else (quotes, comments, groups, several addresses) goes to getaddresses.
_SIMPLE_FROM = re.compile(
    rb"\s*(?:[A-Za-z0-9 ._'-]*<\s*)?[A-Za-z0-9._+=-]+@([A-Za-z0-9.-]+)\s*>?\s*",
)


def from_domain(value: bytes) -> str | None:
    """The domain of the first address in a From field's value (ASCII form, lower case)."""
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple is not None and value.count(b"<") == value.count(b">"):
        domain = simple.group(1).decode("ascii")
    else:
        text = value.decode("utf-8", "replace").replace("\r\n", "")
        for _, addr in getaddresses([text]):
            local, at, domain = addr.rpartition("@")
            if at and local and domain:
                break
        else:
            return None
    try:
        return ascii_domain(domain).lower()
    except ValueError:
        return None


class DkimSigner:
    """Signs messages with a KeySet (module docstring)."""

    @staticmethod
    def settings(cfg: NodeConfig) -> dict[str, Any]:
        """The dkim_* settings of `cfg`: what a reload changes (and sends to SMTP workers)."""
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("dkim_")}

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> DkimSigner:
        """The node's signer; ConfigError naming the file for a key that cannot be used."""
        keys = KeySet.load(cfg.dkim_keys, cfg.dkim_parent_domains, cfg.dkim_default_domain)
        return cls(keys, tuple(cfg.dkim_headers), cfg.dkim_expire_s)

    def __init__(
        self, keys: KeySet, headers: tuple[str, ...] = DEFAULT_HEADERS, expire_s: int = 0
    ) -> None:
        self.keys = keys
        self._headers = tuple(h.strip().lower().encode("ascii") for h in headers if h.strip())
        if b"from" not in self._headers:
            self._headers = (b"from", *self._headers)
        self._expire_s = expire_s
        self.signed: dict[str, int] = {}  # signatures made, by domain (metrics)
        self.failed = 0

    def describe(self) -> dict[str, Any]:
        """For /status: the domains signed for and the key set's fingerprint. (Counts of
        signed messages are in the metrics: the SMTP sessions sign with signers of their
        own, in the node and in each worker, so this one's counts are its reports' only.)"""
        return {
            "domains": sorted({k.domain for k in self.keys.keys}),
            "key_set": self.keys.fingerprint(),
        }

    def sign_report(self, report: bytes, at_s: int) -> bytes:
        """Signatures for a report this node writes (a DSN). A report must go out: when
        signing fails it goes unsigned, and the failure is logged and counted."""
        try:
            return self.sign(report, at_s)[0]
        except SigningError as exc:
            log.error("dkim: a delivery report goes out unsigned: %s", exc)
            return b""

    def sign(self, message: bytes, at_s: int) -> tuple[bytes, tuple[str, ...]]:
        """(the DKIM-Signature headers to put on top of `message`, the domains they are for).

        Nothing when no key signs for the message's From domain. SigningError when a
        key does but signing fails: such a message must not leave unsigned.
        """
        if not self.keys:
            return b"", ()
        try:
            msg = _Message(message, linesep=b"\r\n")
            domain = msg.from_domain()
            chosen = self.keys.for_domain(domain or "")
            if not chosen:
                return b"", ()
            sigs = [msg.sign_with(k, at_s, self._expire_s, self._headers) for k in chosen]
        except (dkim.DKIMException, ValueError, TypeError, IndexError) as exc:
            self.failed += 1
            raise SigningError(f"DKIM signing failed: {exc}") from exc
        for key in chosen:
            self.signed[key.domain] = self.signed.get(key.domain, 0) + 1
        return b"".join(sigs), tuple(dict.fromkeys(k.domain for k in chosen))
