"""DeliveryAgent against receivers as the real world has them, on 127.0.0.1.

Each receiver is a small scripted SMTP server (tests/support/minismtp.py): one
that refuses EHLO, one that speaks only TLS 1.0, one whose STARTTLS fails or is
refused, one that answers `452 4.2.2` (mailbox full) for some recipients, one
without SMTPUTF8 for an internationalized domain. The agent is mqnode's own,
in this process; every server ends with its block.
"""

from __future__ import annotations

import asyncio
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from mqnode.delivery.client import Attempt, DeliveryAgent, Target, Transaction
from mqnode.spool.model import Outcome
from mqnode.tls import required_client_context
from tests.support import minismtp
from tests.support.tlscert import make_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BODY = b"From: a@client.test\r\nTo: b@x.test\r\nSubject: hi\r\nMessage-ID: <m@t>\r\n\r\nhello\r\n"
DELIVERED = Outcome.DELIVERED.value
DEFERRED = Outcome.DEFERRED.value


def _deliver(
    handler: minismtp.Handler,
    rcpts: tuple[tuple[int, str], ...] = ((0, "b@x.test"),),
    require_tls: bool = False,
    body: bytes = BODY,
    mail_from: str = "a@client.test",
    required_tls: ssl.SSLContext | None = None,
    host_name: str = "mx.x.test",
) -> Attempt:
    async def run() -> Attempt:
        async with minismtp.serving(handler) as port:
            agent = DeliveryAgent("client.test", timeout_s=5, required_tls=required_tls)
            try:
                target = Target(host_name, "127.0.0.1", port)
                tx = Transaction((target,), mail_from, rcpts, body, lambda: True, require_tls)
                return await agent.deliver(tx)
            finally:
                await agent.close()

    return asyncio.run(run())


def _outcomes(attempt: Attempt) -> list[str]:
    return [out for _, out, _ in attempt.results]


def _tls10_server(tmp_path: Path) -> ssl.SSLContext:
    """A receiver stuck at TLS 1.0, as old appliances are."""
    cert = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 is deprecated: the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def test_a_receiver_that_refuses_ehlo_gets_helo_and_the_mail() -> None:
    lines: list[bytes] = []
    handler = minismtp.answer(
        b"old.x.test",
        extensions=(b"STARTTLS", b"SIZE 10"),
        received=lines,
        ehlo_refusal=b"502 5.5.2 Error: command not recognized",
    )
    attempt = _deliver(handler)
    assert _outcomes(attempt) == [DELIVERED], attempt
    verbs = [line.split()[0].upper() for line in lines if line]
    assert verbs[:2] == [b"EHLO", b"HELO"], lines
    assert b"STARTTLS" not in verbs  # HELO: no extensions at all
    assert not any(b"SIZE=" in line for line in lines), lines


def test_a_tls_1_0_receiver_gets_the_mail_encrypted(tmp_path: Path) -> None:
    versions: list[str] = []
    handler = minismtp.answer(b"tls10.x.test", tls=_tls10_server(tmp_path), tls_versions=versions)
    attempt = _deliver(handler)
    assert _outcomes(attempt) == [DELIVERED], attempt
    assert versions == ["TLSv1"], versions


def test_mail_that_requires_tls_is_not_sent_over_tls_1_0(tmp_path: Path) -> None:
    lines: list[bytes] = []
    handler = minismtp.answer(b"tls10.x.test", tls=_tls10_server(tmp_path), received=lines)
    attempt = _deliver(handler, require_tls=True)
    assert _outcomes(attempt) == [DEFERRED], attempt
    assert "TLS is required" in attempt.results[0][2], attempt
    assert not any(line.upper().startswith(b"MAIL") for line in lines), "sent in the clear"


def _tls12_server(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A modern receiver whose self-signed certificate names localhost; (context, cert)."""
    cert = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    return ctx, cert.cert


@pytest.mark.parametrize(
    ("trusted", "host_name", "delivered"),
    [(True, "localhost", True), (False, "localhost", False), (True, "mx.x.test", False)],
    ids=["verified", "untrusted-ca", "other-name"],
)
def test_mail_that_requires_tls_goes_only_to_a_verified_host(
    tmp_path: Path, trusted: bool, host_name: str, delivered: bool
) -> None:
    """Postfix's `verify`: the certificate must chain to the configured CAs and name the
    MX host; an opportunistic session would have taken all three."""
    server, cert = _tls12_server(tmp_path)
    lines: list[bytes] = []
    ca = required_client_context(str(cert) if trusted else "")
    handler = minismtp.answer(b"mx.x.test", tls=server, received=lines)
    attempt = _deliver(handler, require_tls=True, required_tls=ca, host_name=host_name)
    if delivered:
        assert _outcomes(attempt) == [DELIVERED], attempt
    else:
        assert _outcomes(attempt) == [DEFERRED], attempt
        assert "TLS is required" in attempt.results[0][2], attempt
        assert not any(line.upper().startswith(b"MAIL") for line in lines), "sent anyway"


@pytest.mark.parametrize("failure", ["refused", "broken handshake"])
def test_a_failed_starttls_is_retried_once_without_tls(
    tmp_path: Path, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Postfix's `may`: when STARTTLS is refused or its handshake fails, the mail goes in
    plaintext over a new connection rather than waiting for a retry that fails the same."""
    lines: list[bytes] = []
    if failure == "refused":
        handler = minismtp.answer(
            b"tlsbad.x.test", received=lines, starttls_refusal=b"454 4.7.0 TLS not available"
        )
    else:  # the server expects TLS 1.3 only with a cipher list nothing matches: it fails
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
        handler = minismtp.answer(b"tlsbad.x.test", received=lines, tls=server)
    with caplog.at_level("INFO", logger="mqnode.delivery.client"):
        attempt = _deliver(handler)
    assert _outcomes(attempt) == [DELIVERED], attempt
    assert sum(1 for line in lines if line.upper().startswith(b"EHLO")) >= 2, lines
    assert "delivering without TLS" in caplog.text


def test_mailbox_full_is_a_deferral_for_that_recipient_not_the_hosts_limit() -> None:
    lines: list[bytes] = []

    def full(line: bytes) -> bytes | None:
        return b"452 4.2.2 Mailbox full" if b"full" in line else None

    rcpts = ((0, "ok1@x.test"), (1, "full@x.test"), (2, "ok2@x.test"))
    attempt = _deliver(minismtp.answer(b"mx.x.test", received=lines, rcpt=full), rcpts)
    by_index = {i: (out, reply) for i, out, reply in attempt.results}
    assert by_index[1] == (DEFERRED, "452 4.2.2 Mailbox full"), attempt
    assert by_index[0][0] == by_index[2][0] == DELIVERED
    offered = [line for line in lines if line.upper().startswith(b"RCPT") and b"full" in line]
    assert len(offered) == 1, f"re-offered in the same attempt: {offered}"


def test_the_recipient_limit_reply_still_sends_the_rest_at_once() -> None:
    lines: list[bytes] = []
    seen: list[bytes] = []

    def limit(line: bytes) -> bytes | None:
        seen.append(line)
        return b"452 4.5.3 Too many recipients" if len(seen) == 2 else None

    rcpts = ((0, "r0@x.test"), (1, "r1@x.test"), (2, "r2@x.test"))
    attempt = _deliver(minismtp.answer(b"mx.x.test", received=lines, rcpt=limit), rcpts)
    assert _outcomes(attempt) == [DELIVERED] * 3, attempt


def _mail_lines(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if line.upper().startswith((b"MAIL", b"RCPT"))]


def test_an_idn_recipient_goes_as_a_labels_to_a_host_without_smtputf8() -> None:
    lines: list[bytes] = []
    attempt = _deliver(
        minismtp.answer(b"mx.x.test", extensions=(b"8BITMIME",), received=lines),
        ((0, "user@bücher.test"),),
    )
    assert _outcomes(attempt) == [DELIVERED], attempt
    mail, rcpt = _mail_lines(lines)
    assert rcpt == b"RCPT TO:<user@xn--bcher-kva.test>", rcpt
    assert b"SMTPUTF8" not in mail


def test_utf8_headers_declare_smtputf8_where_offered() -> None:
    lines: list[bytes] = []
    body = "Subject: Grüße\r\nFrom: a@client.test\r\n\r\nhi\r\n".encode()
    handler: Callable[..., object] = minismtp.answer(
        b"mx.x.test", extensions=(b"SMTPUTF8", b"8BITMIME"), received=lines
    )
    attempt = _deliver(handler, body=body)  # type: ignore[arg-type]
    assert _outcomes(attempt) == [DELIVERED], attempt
    mail = _mail_lines(lines)[0]
    assert b"SMTPUTF8" in mail and b"BODY=8BITMIME" in mail, mail


def test_a_refusal_is_reported_as_its_reply_text_not_a_tuple() -> None:
    handler = minismtp.answer(b"mx.x.test", ehlo_refusal=b"421 4.3.2 Service shutting down")
    attempt = _deliver(handler)
    reply = attempt.results[0][2]
    assert "421 4.3.2 Service shutting down" in reply and "(421," not in reply, reply
