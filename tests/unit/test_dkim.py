"""DKIM keys and signatures (mqnode/signing), checked by dkimpy's verifier.

The verifier gets the public key from the TXT record `DkimKey.txt_record` makes,
as a receiver would from DNS; signing goes through OpenSSL, verifying through
dkimpy's own RSA and PyNaCl, so the two sides share no signing code.
"""

from __future__ import annotations

import logging
import re
from email.utils import getaddresses
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from mqnode.clock import ManualClock
from mqnode.delivery.client import dot_stuff
from mqnode.errors import ConfigError
from mqnode.signing.dkim_signer import DkimSigner, from_domain
from mqnode.signing.keys import (
    ED25519,
    RSA,
    DkimKey,
    KeySet,
    keygen,
    load_key,
    parse_spec,
    signing_domains,
    zone_lines,
)
from mqnode.smtp.data import unstuff
from mqnode.smtp.handler import SmtpIngress
from mqnode.spool.addresses import ascii_domain
from mqnode.spool.line_ends import only_crlf
from mqnode.spool.store import QueueStore

from .kit import Applies, smtp_data

AT = 1_796_540_000
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Sun, 06 Dec 2026 07:00:00 +0000\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"X-Not-Signed: yes\r\n"
    b"\r\n"
    b"hello\r\n"
)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> DkimKey:
    return keygen("example.org", "rsa1", RSA, 2048, keydir)


@pytest.fixture(scope="module")
def ed_key(keydir: Path) -> DkimKey:
    return keygen("example.org", "ed1", ED25519, 0, keydir)


def _dns(*keys: DkimKey) -> dict[bytes, bytes]:
    return {f"{k.record_name}.".encode(): k.txt_record().encode() for k in keys}


def _verify(message: bytes, *keys: DkimKey) -> list[bool]:
    records = _dns(*keys)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name if name.endswith(b".") else name + b".")

    count = len(re.findall(rb"(?mi)^DKIM-Signature:", message.split(b"\r\n\r\n", 1)[0]))
    d = dkim.DKIM(message)

    def one(i: int) -> bool:
        try:
            return bool(d.verify(idx=i, dnsfunc=dnsfunc))
        except dkim.ValidationError:  # e.g. a body hash that does not match
            return False

    return [one(i) for i in range(count)]


def _signed(signer: DkimSigner, message: bytes = MESSAGE) -> bytes:
    sigs, _ = signer.sign(message, AT)
    return sigs + message


def test_rsa_and_ed25519_keys_of_one_domain_give_two_signatures_that_verify(
    rsa_key: DkimKey, ed_key: DkimKey
) -> None:
    signer = DkimSigner(KeySet([rsa_key, ed_key]))
    sigs, domains = signer.sign(MESSAGE, AT)
    assert domains == ("example.org",)
    assert sigs.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in sigs and b"a=ed25519-sha256" in sigs
    assert _verify(sigs + MESSAGE, rsa_key, ed_key) == [True, True]
    assert signer.signed == {"example.org": 2}


def test_the_defaults_are_opendkims(rsa_key: DkimKey) -> None:
    sigs, _ = DkimSigner(KeySet([rsa_key])).sign(MESSAGE, AT)
    text = sigs.decode().replace("\r\n ", " ")
    assert "c=relaxed/relaxed" in text and f"t={AT};" in text and "x=" not in text
    h = re.search(r"h=([^;]+);", text)
    assert h is not None
    # present fields of the standard set, From once more than it occurs; not X-Not-Signed
    assert h.group(1).replace(" ", "") == "from:to:subject:date:message-id:from"


def test_x_is_the_receive_time_plus_the_expiry(rsa_key: DkimKey) -> None:
    sigs, _ = DkimSigner(KeySet([rsa_key]), expire_s=86400).sign(MESSAGE, AT)
    assert f"x={AT + 86400};".encode() in sigs.replace(b"\r\n ", b" ")


def test_a_changed_message_fails_verification(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    signed = _signed(DkimSigner(KeySet([rsa_key, ed_key])))
    assert _verify(signed.replace(b"hello\r\n", b"hullo\r\n"), rsa_key, ed_key) == [False, False]
    # a second From cannot be slipped in: From is oversigned
    evil = signed.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice")
    assert _verify(evil, rsa_key, ed_key) == [False, False]


def test_a_signature_already_there_is_kept_and_ours_goes_on_top(
    rsa_key: DkimKey, ed_key: DkimKey
) -> None:
    first = _signed(DkimSigner(KeySet([ed_key])))
    both = _signed(DkimSigner(KeySet([rsa_key])), first)
    assert both.index(b"a=rsa-sha256") < both.index(b"a=ed25519-sha256")
    assert _verify(both, rsa_key, ed_key) == [True, True]


@pytest.mark.parametrize(
    "body",
    [
        b"caf\xc3\xa9 8-bit, as 8BITMIME sends it\r\n",
        b"x" * 998 + b"\r\n",
        (b"a line of a large message\r\n" * 200_000),  # ~5 MiB
        b"",
    ],
    ids=["8bit", "long-line", "5MiB", "empty"],
)
def test_bodies_of_every_kind_verify(rsa_key: DkimKey, body: bytes) -> None:
    message = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    assert _verify(_signed(DkimSigner(KeySet([rsa_key])), message), rsa_key) == [True]


def test_a_utf8_from_address_matches_its_domains_ascii_key(keydir: Path) -> None:
    key = keygen("xn--bcher-kva.example", "s", ED25519, 0, keydir)
    message = (
        "From: Jöran <jöran@bücher.example>\r\nTo: b@example.net\r\nSubject: Grüße\r\n\r\nhej\r\n"
    ).encode()
    sigs, domains = DkimSigner(KeySet([key])).sign(message, AT)
    assert domains == ("xn--bcher-kva.example",)
    assert _verify(sigs + message, key) == [True]


def test_which_domain_signs(keydir: Path, rsa_key: DkimKey) -> None:
    service = keygen("mail.service.test", "s", ED25519, 0, keydir)

    def domains(keys: KeySet, from_addr: str) -> tuple[str, ...]:
        message = f"From: {from_addr}\r\nSubject: x\r\n\r\nx\r\n".encode()
        return DkimSigner(keys).sign(message, AT)[1]

    exact = KeySet([rsa_key])
    assert domains(exact, "a@example.org") == ("example.org",)
    assert domains(exact, "a@EXAMPLE.ORG") == ("example.org",)
    assert domains(exact, "a@news.example.org") == ()  # no parent domains unless asked
    assert domains(exact, "a@other.test") == ()
    parents = KeySet([rsa_key], parent_domains=True)
    assert domains(parents, "a@news.example.org") == ("example.org",)
    assert domains(parents, "a@org") == ()
    catch_all = KeySet([rsa_key, service], default_domain="mail.service.test")
    assert domains(catch_all, "a@customer.test") == ("mail.service.test",)
    assert domains(catch_all, "a@example.org") == ("example.org",)
    assert DkimSigner(exact).sign(b"Subject: no From\r\n\r\nx\r\n", AT) == (b"", ())


def test_keygen_writes_a_private_file_and_the_record_to_publish(keydir: Path) -> None:
    key = keygen("example.com", "sel", RSA, 2048, keydir)
    path = Path(key.path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert key.txt_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    line = zone_lines(key)
    assert line.startswith("sel._domainkey.example.com. IN TXT (")
    assert all(len(part) <= 255 for part in re.findall(r'"([^"]*)"', line))
    assert load_key("example.com", "sel", str(path)).public_b64 == key.public_b64
    with pytest.raises(ConfigError, match="exists"):
        keygen("example.com", "sel", RSA, 2048, keydir)
    with pytest.raises(ConfigError, match="--bits"):
        keygen("example.com", "sel2", RSA, 1024, keydir)


def test_key_files_that_cannot_sign_are_refused_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.key"):
        load_key("example.org", "s", str(tmp_path / "missing.key"))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match=r"garbage\.key is not an unencrypted PEM"):
        load_key("example.org", "s", str(garbage))
    weak = tmp_path / "weak.key"
    weak.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    weak.chmod(0o644)
    with pytest.raises(ConfigError, match=r"weak\.key is readable by others"):
        load_key("example.org", "s", str(weak))
    weak.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert load_key("example.org", "s", str(weak)).algorithm == RSA  # PKCS#1 PEM too
    assert "1024-bit RSA key" in caplog.text


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("example.org:s", "not DOMAIN:SELECTOR:KEY_FILE"),
        ("example.org::/k", "selector"),
        ("exa mple.org:s:/k", "domain"),
        ("bücher.example:s:/k", "domain"),
    ],
)
def test_bad_key_specs(spec: str, said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        parse_spec(spec)


def test_one_selector_twice_and_a_default_domain_without_key_are_refused(
    rsa_key: DkimKey,
) -> None:
    with pytest.raises(ConfigError, match="given twice"):
        KeySet([rsa_key, rsa_key])
    with pytest.raises(ConfigError, match="dkim_default_domain"):
        KeySet([rsa_key], default_domain="other.test")


def test_the_fingerprint_follows_the_keys_not_their_order(
    rsa_key: DkimKey, ed_key: DkimKey
) -> None:
    a = KeySet([rsa_key, ed_key]).fingerprint()
    assert a == KeySet([ed_key, rsa_key]).fingerprint() and len(a) == 16
    assert a != KeySet([rsa_key]).fingerprint() and KeySet([]).fingerprint() == ""


def _from_domain_by_the_email_package(value: bytes) -> str | None:
    for _, addr in getaddresses([value.decode("utf-8", "replace").replace("\r\n", "")]):
        local, at, domain = addr.rpartition("@")
        if at and local and domain:
            try:
                return ascii_domain(domain).lower()
            except ValueError:
                return None
    return None


_PIECES = st.sampled_from(
    [" ", "\r\n ", "a", "Z", "0", ".", "-", "_", "'", "+", "=", "@", "<", ">", '"', ",", ";",
     ":", "(", ")", "\\", "é", "b.example", "xn--bcher-kva.example", "Alice Smith"]
)  # fmt: skip


@given(st.lists(_PIECES, max_size=14))
def test_the_from_domain_is_the_email_packages(pieces: list[str]) -> None:
    """The fast reading of simple From fields never disagrees with the full parser."""
    value = "".join(pieces).encode()
    assert from_domain(value) == _from_domain_by_the_email_package(value)


def test_the_from_domain_of_common_fields() -> None:
    for value, domain in [
        (b" a@B.example", "b.example"),
        (b" Alice <a@b.example>", "b.example"),
        (b' "Smith, Alice" <a@b.example>', "b.example"),
        (b" a@b.example (Alice)", "b.example"),
        (b" x@y.example, a@b.example", "y.example"),
        (" Jöran <j@bücher.example>".encode(), "xn--bcher-kva.example"),
        (b" undisclosed-recipients:;", None),
        (b" Alice <a@b.example", "b.example"),
    ]:
        assert from_domain(value) == domain, value


def test_signing_domains_reads_the_header_only() -> None:
    sig = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\td=Example.ORG; s=s1; b=x\r\n"
    head = sig + b"dkim-signature: v=1; d=second.example; s=s2; b=y\r\nSubject: hi\r\n"
    body = b"DKIM-Signature: v=1; d=in-the-body.example; b=z\r\n"
    assert signing_domains(head + b"\r\n" + body) == ["example.org", "second.example"]
    assert signing_domains(head) == ["example.org", "second.example"]  # no blank line
    assert signing_domains(b"Subject: x\r\n\r\n" + sig) == []


@pytest.mark.parametrize(
    "body",
    [
        b"line one\rline two\r\n",  # a bare CR
        b"line one\nline two\n",  # bare LFs
        b"a\r\nb\rc\nd\r\n.dot line\r\nend",  # all of it, a dot line, no final line end
    ],
)
def test_a_body_with_bare_line_ends_verifies_as_delivered(
    rsa_key: DkimKey, store: QueueStore, body: bytes
) -> None:
    """Delivery sends bare CRs and LFs as CRLF (dot_stuff); intake signs the body so, and
    keeps it so. (dkimpy reads a bare CR as part of its line: a signature over the body
    as received failed at the receiver.)"""
    rep = Applies(store)
    ing = SmtpIngress(
        rep, ManualClock(), lambda n: b"\1" * n, "n1", "mx.example.org", ["127.0.0.0/8"], 10,
        lambda: 0.0, signer=DkimSigner(KeySet([rsa_key])),
    )  # fmt: skip
    reply = smtp_data(ing, MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body)
    assert reply.startswith("250"), reply
    (queued,) = store.list_messages(10)
    stored = store.read_body(queued)
    received = unstuff(dot_stuff(stored))  # on the wire, then as the receiver reads it
    assert _verify(received, rsa_key) == [True]
    assert only_crlf(stored)  # what is kept is what is signed and sent (but for dots)


def test_a_header_section_without_its_empty_line_is_ended_and_signed(
    rsa_key: DkimKey, store: QueueStore
) -> None:
    """Headers, then a line that is no header field: the header section ends there with
    an empty line put in (as Postfix's cleanup does), and the message is signed. Without
    it dkimpy refused the message, which the client got as 451 on every retry."""
    rep = Applies(store)
    ids = iter(range(1, 100))
    ing = SmtpIngress(
        rep, ManualClock(), lambda n: bytes([next(ids)]) * n, "n1", "mx.example.org",
        ["127.0.0.0/8"], 10, lambda: 0.0, signer=DkimSigner(KeySet([rsa_key])),
    )  # fmt: skip
    sent = b"From: Alice <alice@example.org>\r\nSubject: hi\r\nhello world\r\n"
    reply = smtp_data(ing, sent)
    assert reply.startswith("250"), reply
    no_header = smtp_data(ing, b"hello world\r\n")  # nothing to sign for, queued unsigned
    assert no_header.startswith("250"), no_header
    first, second = sorted(store.list_messages(10), key=lambda m: m.queue_id)
    stored = store.read_body(first)
    assert stored.endswith(b"Subject: hi\r\n\r\nhello world\r\n")
    assert _verify(unstuff(dot_stuff(stored)), rsa_key) == [True]
    assert store.read_body(second).endswith(b"\r\n\r\nhello world\r\n")
