"""Delivery to a relay host that needs a login: verified TLS first, AUTH, else deferral.

Real sinks on 127.0.0.1 (aiosmtpd, STARTTLS with a throwaway certificate for
127.0.0.1, AUTH PLAIN/LOGIN required) and, in the last test, a real 3-node
cluster whose relay_host is such a sink. The password must never reach a
relay that did not prove who it is over TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqnode.delivery.client import DeliveryAgent, RelayAuth, Target, Transaction
from mqnode.spool.model import Outcome
from tests.support import minismtp
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.smtp import make_message, submit
from tests.support.smtpsink import Sink, SinkHost, bind_common_port
from tests.support.tlscert import CertFiles, make_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

USER, PASSWORD = "mailer@relay.test", "correct horse battery"
BODY = b"Subject: s\r\nMessage-ID: <relay-auth@test>\r\n\r\nhello\r\n"


def _server_tls(cert: CertFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


@pytest.fixture
def cert(tmp_path: Path) -> CertFiles:
    return make_cert(tmp_path / "relay-cert")


@pytest.fixture
def host() -> Iterator[SinkHost]:
    with SinkHost() as h:
        yield h


def _sink(host: SinkHost, cert: CertFiles | None, users: dict[str, str] | None) -> Sink:
    _port, socks = bind_common_port(["127.0.0.1"])
    tls = _server_tls(cert) if cert is not None else None
    return host.add("relay", socks["127.0.0.1"], tls_context=tls, users=users)


def _deliver(sink: Sink, auth: RelayAuth, rcpts: int = 1) -> list[tuple[int, str, str]]:
    target = Target("127.0.0.1", *sink.address, secure=True)

    async def run() -> list[tuple[int, str, str]]:
        agent = DeliveryAgent("client.test", timeout_s=10, relay_auth=auth)
        out: list[tuple[int, str, str]] = []
        try:
            for n in range(rcpts):
                to = ((0, f"to{n}@dest.test"),)
                tx = Transaction((target,), "from@client.test", to, BODY, lambda: True)
                out += (await agent.deliver(tx)).results
        finally:
            await agent.close()
            # A TLS transport closes its socket only after the TLS shutdown, a few loop
            # turns later; asyncio.run would otherwise close the loop first.
            await asyncio.sleep(0.2)
        return out

    return asyncio.run(run())


def _auth(cert: CertFiles, password: str = PASSWORD) -> RelayAuth:
    return RelayAuth(USER, password, ssl.create_default_context(cafile=str(cert.cert)))


def test_logs_in_over_verified_tls_and_reuses_the_session(host: SinkHost, cert: CertFiles) -> None:
    sink = _sink(host, cert, {USER: PASSWORD})
    results = _deliver(sink, _auth(cert), rcpts=3)
    assert [r[1] for r in results] == [Outcome.DELIVERED.value] * 3
    assert [(d.auth_user, d.tls) for d in sink.delivered()] == [(USER, True)] * 3
    assert sink.auth_attempts == [(USER, True, True)]  # one login, one session for all three
    assert sink.connections == 1


def test_a_refused_login_defers(host: SinkHost, cert: CertFiles) -> None:
    sink = _sink(host, cert, {USER: PASSWORD})
    (result,) = _deliver(sink, _auth(cert, password="wrong password"))
    assert result[1] == Outcome.DEFERRED.value
    assert "refused the login of 'mailer@relay.test': 535" in result[2]
    assert "wrong password" not in result[2]
    assert sink.delivered() == []


def test_no_starttls_defers_and_the_password_is_never_sent(host: SinkHost, cert: CertFiles) -> None:
    sink = _sink(host, None, {USER: PASSWORD})
    (result,) = _deliver(sink, _auth(cert))
    assert result[1] == Outcome.DEFERRED.value
    assert "does not offer STARTTLS" in result[2]
    assert sink.auth_attempts == []
    assert sink.delivered() == []


def test_an_unverifiable_certificate_defers_before_any_login(
    host: SinkHost, cert: CertFiles, tmp_path: Path
) -> None:
    sink = _sink(host, cert, {USER: PASSWORD})
    other_ca = make_cert(tmp_path / "someone-else")  # trusts a different certificate
    (result,) = _deliver(sink, _auth(other_ca))
    assert result[1] == Outcome.DEFERRED.value
    assert "CERTIFICATE_VERIFY_FAILED" in result[2] or "certificate verify failed" in result[2]
    assert sink.auth_attempts == []
    assert sink.delivered() == []


def test_a_relay_that_offers_no_auth_defers(host: SinkHost, cert: CertFiles) -> None:
    sink = _sink(host, cert, None)
    (result,) = _deliver(sink, _auth(cert))
    assert result[1] == Outcome.DEFERRED.value
    assert "offers no AUTH mechanism" in result[2]
    assert sink.delivered() == []


def test_implicit_tls_relay(cert: CertFiles) -> None:
    """relay_implicit_tls: TLS from the first byte (port 465 style), then AUTH."""
    received: list[bytes] = []

    async def run() -> tuple[list[tuple[int, str, str]], list[bytes]]:
        # aiosmtpd has no implicit-TLS server mode: a mini server on the TLS stream.
        relay = minismtp.answer(b"relay.test", (b"AUTH PLAIN", b"8BITMIME"), received)
        async with minismtp.serving(relay, tls=_server_tls(cert)) as port:
            auth = RelayAuth(USER, PASSWORD, _auth(cert).tls, implicit_tls=True)
            agent = DeliveryAgent("client.test", timeout_s=10, relay_auth=auth)
            try:
                attempt = await agent.deliver(
                    Transaction(
                        (Target("127.0.0.1", "127.0.0.1", port, secure=True),),
                        "from@client.test",
                        ((0, "to@dest.test"),),
                        BODY,
                        lambda: True,
                    )
                )
            finally:
                await agent.close()
        return attempt.results, received

    results, lines = asyncio.run(asyncio.wait_for(run(), 30))
    assert [r[1] for r in results] == [Outcome.DELIVERED.value]
    assert any(line.startswith(b"AUTH PLAIN ") for line in lines), lines


def test_a_cluster_relays_through_a_host_that_needs_a_login(
    tmp_path: Path, host: SinkHost, cert: CertFiles
) -> None:
    sink = _sink(host, cert, {USER: PASSWORD})
    auth_file = tmp_path / "relay-auth"
    auth_file.write_text(f"{USER}:{PASSWORD}\n")
    auth_file.chmod(0o600)
    args = (
        *FAST_TUNING,
        "--relay-auth-file",
        str(auth_file),
        "--relay-tls-ca-file",
        str(cert.cert),
    )
    relay = f"127.0.0.1:{sink.address[1]}"
    with Cluster(tmp_path / "c", extra_args=args, relay_host=relay) as c:
        lead = c.leader()
        code, text, _qid = submit(
            "127.0.0.1",
            c.nodes[lead].smtp_port,
            "from@client.test",
            ["to@dest.test"],
            make_message(1024).data,
        )
        assert code == 250, text
        delivered = c.poll(
            "the relay to receive the message",
            lambda: (sink.delivered() or None, f"{len(sink.datas)} data events"),
            30.0,
        )
    assert [(d.auth_user, d.tls) for d in delivered] == [(USER, True)]
