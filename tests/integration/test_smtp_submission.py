"""Submission security on real nodes: STARTTLS, AUTH, implicit TLS, relay policy, limits.

One 3-node cluster for the module, with TLS, a users file, an implicit-TLS
port per node, `allowed_networks = 127.0.0.1/32, 127.0.1.0/24` and small
per-client and per-session limits. Clients bind their socket to a chosen
loopback source address: 127.0.0.2 and 127.0.0.3 are *outside* the allowed
networks (a remote client, as far as the node can tell), 127.0.1.x are inside.
Per-client limits key on the address, so each limit test uses its own
address and the tests do not use up each other's budgets.

No timing assertions: a rate limit is provoked by trying until refused (a
bounded number of times, far above the limit), the idle timeout by waiting
for it with a generous bound.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mqnode.smtp.auth import hash_password
from tests.support.checks import assert_acked_once, assert_not_queued
from tests.support.cluster import FAST_TUNING, HOST, Cluster, free_ports
from tests.support.rawsmtp import RawSmtp
from tests.support.smtp import make_message, queue_id_from_reply
from tests.support.tlscert import CertFiles, make_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

USER, PASSWORD = "alice@client.test", "correct horse battery staple"
SENDER, RCPT = "alice@client.test", "bob@example.test"
OUTSIDE, OUTSIDE_2 = "127.0.0.2", "127.0.0.3"
CONN_RATE_CLIENT, MSG_RATE_CLIENT = "127.0.1.4", "127.0.1.5"
CONCURRENT_CLIENT, LIMITS_CLIENT = "127.0.1.6", "127.0.1.7"
PIPELINING_CLIENT = "127.0.1.8"
CONN_RATE, MSG_RATE, MAX_CONNS = 30, 20, 4
MAX_HEADERS, MAX_COMMANDS, IDLE_S = 20, 100, 3


class SubmissionCluster(Cluster):
    """A Cluster whose nodes also listen for implicit TLS, each on its own port."""

    def __init__(self, base_dir: Path, extra_args: Sequence[str], cert: CertFiles) -> None:
        super().__init__(base_dir, 3, extra_args=extra_args)
        self.smtps_ports = free_ports(len(self.nodes))
        self.cert = cert

    def tls(self) -> ssl.SSLContext:
        """A client context that verifies the nodes' certificate."""
        return self.cert.client_context()

    def command(self, i: int) -> list[str]:
        return [*super().command(i), "--smtps-addr", f"{HOST}:{self.smtps_ports[i]}"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "2-smtp-workers"])
def sub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cert: CertFiles
) -> Iterator[SubmissionCluster]:
    """The cluster, once with SMTP sessions in the node and once in two worker processes
    (every limit here must hold per node, whichever worker takes the connection)."""
    base = tmp_path_factory.mktemp("submission")
    users = base / "users"
    users.write_text(f"# test users\n{USER}:{hash_password(PASSWORD)}\n", encoding="utf-8")
    users.chmod(0o600)
    args = [
        *FAST_TUNING,
        "--smtp-tls-cert",
        str(cert.cert),
        "--smtp-tls-key",
        str(cert.key),
        "--smtp-users-file",
        str(users),
        "--client-limit-exceptions",
        "",
        "--allowed-networks",
        "127.0.0.1/32,127.0.1.0/24",
        "--client-connection-rate-per-min",
        str(CONN_RATE),
        "--client-message-rate-per-min",
        str(MSG_RATE),
        "--client-max-connections",
        str(MAX_CONNS),
        "--max-header-count",
        str(MAX_HEADERS),
        "--max-commands-per-session",
        str(MAX_COMMANDS),
        "--smtp-idle-timeout-s",
        str(IDLE_S),
        "--smtp-workers",
        str(request.param),
    ]
    with SubmissionCluster(base, args, cert) as c:
        yield c


def smtp(c: Cluster, source: str, i: int = 0) -> smtplib.SMTP:
    return smtplib.SMTP(
        HOST,
        c.nodes[i].smtp_port,
        local_hostname="client.test",
        timeout=30,
        source_address=(source, 0),
    )


def send(client: smtplib.SMTP, data: bytes) -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session; the first refusal or the DATA reply."""
    code, raw = client.mail(SENDER)
    if code != 250:
        return code, raw.decode()
    code, raw = client.rcpt(RCPT)
    if code != 250:
        return code, raw.decode()
    try:
        code, raw = client.data(data)
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code, exc.smtp_error.decode()
    return code, raw.decode()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def check_queued(c: Cluster, acked: dict[str, str], via: str) -> None:
    c.wait_applied_equal()
    assert_acked_once(c, acked)
    qid = next(iter(acked.values()))
    body = c.queue_body(0, qid)
    assert f" with {via} ".encode() in body, body[:400]


# --- relay policy and AUTH -----------------------------------------------------


def test_outside_client_without_auth_cannot_relay(sub: SubmissionCluster) -> None:
    msg = make_message(1024)
    with smtp(sub, OUTSIDE) as client:
        client.ehlo()
        code, text = send(client, msg.data)
    assert code == 554 and "5.7.1" in text, (code, text)
    with smtp(sub, OUTSIDE) as client:  # TLS alone does not make a client trusted
        client.starttls(context=sub.tls())
        client.ehlo()
        code, text = send(client, msg.data)
    assert code == 554 and "5.7.1" in text, (code, text)
    assert_not_queued(sub, [msg.message_id])


def test_auth_is_not_offered_or_accepted_before_starttls(sub: SubmissionCluster) -> None:
    with smtp(sub, OUTSIDE) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth"), client.esmtp_features
        code, text = client.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
        assert code == 538, (code, text)
        code, _ = client.mail(SENDER)
        assert code == 554


def test_outside_client_relays_after_starttls_and_auth_plain(sub: SubmissionCluster) -> None:
    msg = make_message(2048)
    with smtp(sub, OUTSIDE, i=1) as client:
        client.starttls(context=sub.tls())
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert not client.has_extn("starttls")
        code, text = client.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
        assert code == 235, (code, text)
        code, text = send(client, msg.data)
    qid = queue_id_from_reply(text)
    assert code == 250 and qid, (code, text)
    check_queued(sub, {msg.message_id: qid}, "ESMTPSA")


def test_auth_login_mechanism(sub: SubmissionCluster) -> None:
    msg = make_message(1024)
    with smtp(sub, OUTSIDE) as client:
        client.starttls(context=sub.tls())
        client.ehlo()
        client.user, client.password = USER, PASSWORD
        code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235, (code, text)
        code, text = send(client, msg.data)
    qid = queue_id_from_reply(text)
    assert code == 250 and qid, (code, text)
    check_queued(sub, {msg.message_id: qid}, "ESMTPSA")


def test_wrong_passwords_get_535_then_421(sub: SubmissionCluster) -> None:
    with smtp(sub, OUTSIDE_2) as client:
        client.starttls(context=sub.tls())
        client.ehlo()
        for wrong in ("nope", PASSWORD + "x"):
            code, text = client.docmd("AUTH", "PLAIN " + plain(USER, wrong))
            assert code == 535 and "5.7.8" in text.decode(), (code, text)
        code, text = client.docmd("AUTH", "PLAIN " + plain("nobody@client.test", PASSWORD))
        assert code == 421 and "4.7.0" in text.decode(), (code, text)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_implicit_tls_port(sub: SubmissionCluster) -> None:
    msg = make_message(1024)
    with smtplib.SMTP_SSL(
        HOST,
        sub.smtps_ports[2],
        local_hostname="client.test",
        timeout=30,
        source_address=(OUTSIDE, 0),
        context=sub.tls(),
    ) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        client.login(USER, PASSWORD)
        code, text = send(client, msg.data)
    qid = queue_id_from_reply(text)
    assert code == 250 and qid, (code, text)
    check_queued(sub, {msg.message_id: qid}, "ESMTPSA")


def test_allowed_network_needs_no_auth(sub: SubmissionCluster) -> None:
    msg = make_message(1024)
    with smtp(sub, "127.0.0.1") as client:
        client.ehlo()
        code, text = send(client, msg.data)
    qid = queue_id_from_reply(text)
    assert code == 250 and qid, (code, text)
    check_queued(sub, {msg.message_id: qid}, "ESMTP")


def test_help_lists_commands_from_the_shared_table(sub: SubmissionCluster) -> None:
    # The command table is shared per class and bound on lookup (smtpserver._CountedMethods);
    # HELP reads it whole, and HELP <verb> one entry's syntax.
    with smtp(sub, "127.0.0.1") as client:
        client.ehlo()
        code, text = client.docmd("HELP")
        assert code == 250, text
        assert {b"MAIL", b"RCPT", b"DATA", b"EHLO", b"STARTTLS"} <= set(text.split()), text
        code, text = client.docmd("HELP", "MAIL")
        assert code == 250 and text.startswith(b"Syntax: MAIL FROM:"), text
        assert client.docmd("HELP", "NOSUCH")[0] == 501
        assert client.noop()[0] == 250


def test_path_that_crashes_the_address_parser_is_a_bad_address(sub: SubmissionCluster) -> None:
    # "<0@[@0>" makes email's parser raise AttributeError inside aiosmtpd (found by
    # Hypothesis): answered as a malformed address, and the session goes on.
    with smtp(sub, "127.0.0.1") as client:
        client.ehlo()
        code, text = client.docmd("MAIL", "FROM:<0@[@0>")
        assert code == 553, (code, text)
        assert client.noop()[0] == 250


# --- per-client limits ----------------------------------------------------------


def test_connection_rate_limit_gets_421(sub: SubmissionCluster) -> None:
    port = sub.nodes[0].smtp_port
    greetings = []
    for _ in range(CONN_RATE * 5):
        with RawSmtp.connect(port, CONN_RATE_CLIENT) as s:
            code, text = s.reply()
            greetings.append(code)
            if code == 421:
                assert "4.7.0" in text and "too many connections" in text, text
                assert s.read_until_eof() == [] and s.eof
                break
            s.command("QUIT")
            s.read_until_eof()
    assert greetings[-1] == 421, f"never refused after {len(greetings)} connections"
    assert greetings.count(220) >= CONN_RATE - 1  # the burst allowance was honoured


def test_message_rate_limit_gets_450(sub: SubmissionCluster) -> None:
    with smtp(sub, MSG_RATE_CLIENT) as client:
        client.ehlo()
        codes = []
        for _ in range(MSG_RATE * 4):
            code, text = client.mail(SENDER)
            codes.append(code)
            if code == 450:
                assert b"4.7.1" in text, text
                break
            client.rset()
        assert codes[-1] == 450, f"never refused after {len(codes)} messages"
        assert client.noop()[0] == 250  # the session itself goes on


def test_concurrent_connection_cap_gets_421(sub: SubmissionCluster) -> None:
    port = sub.nodes[0].smtp_port
    held = [RawSmtp.connect(port, CONCURRENT_CLIENT) for _ in range(MAX_CONNS)]
    try:
        assert [s.reply()[0] for s in held] == [220] * MAX_CONNS
        with RawSmtp.connect(port, CONCURRENT_CLIENT) as extra:
            code, text = extra.reply()
            assert code == 421 and "open connections" in text, (code, text)
        held[0].command("QUIT")
        held[0].read_until_eof()

        def probe() -> tuple[bool | None, str]:
            with RawSmtp.connect(port, CONCURRENT_CLIENT) as again:
                code, text = again.reply()
                again.command("QUIT")
                return (True if code == 220 else None), text

        sub.poll("a new connection once one is closed", probe, 20.0)
    finally:
        for s in held:
            s.close()


# --- per-session limits ----------------------------------------------------------


def headers_message(n: int) -> bytes:
    msg = make_message(512)
    extra = b"".join(b"X-Filler-%d: %d\r\n" % (k, k) for k in range(n))
    return extra + msg.data  # make_message has 6 header fields


def test_header_count_limit_gets_552(sub: SubmissionCluster) -> None:
    with smtp(sub, LIMITS_CLIENT) as client:
        client.ehlo()
        code, text = send(client, headers_message(MAX_HEADERS))  # 26 fields
        assert code == 552 and "5.3.4" in text, (code, text)
        code, text = send(client, headers_message(MAX_HEADERS - 6))  # exactly the limit
        assert code == 250, (code, text)


def test_command_count_limit_gets_421_and_close(sub: SubmissionCluster) -> None:
    with RawSmtp.connect(sub.nodes[0].smtp_port, LIMITS_CLIENT) as s:
        assert s.reply()[0] == 220
        s.send(b"EHLO client.test\r\n" + b"NOOP\r\n" * (MAX_COMMANDS + 50))
        lines = s.read_until_eof()
    assert s.eof, lines[-3:]
    assert lines[-1].startswith("421 4.7.0"), lines[-3:]
    assert lines.count("250 OK") == MAX_COMMANDS - 1  # EHLO was the first command


def test_long_lines_get_500_5_5_2(sub: SubmissionCluster) -> None:
    with RawSmtp.connect(sub.nodes[0].smtp_port, LIMITS_CLIENT) as s:
        assert s.reply()[0] == 220
        assert s.command("EHLO client.test")[0] == 250
        code, text = s.command("NOOP " + "x" * 2000)
        assert code == 500 and "5.5.2" in text, text
        assert s.command(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert s.command(f"RCPT TO:<{RCPT}>")[0] == 250
        assert s.command("DATA")[0] == 354
        s.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
        code, text = s.reply()
        assert code == 500 and "5.5.2" in text, text
        assert s.command("QUIT")[0] == 221


def test_idle_timeout_gets_421(sub: SubmissionCluster) -> None:
    with RawSmtp.connect(sub.nodes[0].smtp_port, LIMITS_CLIENT) as s:
        assert s.reply()[0] == 220
        assert s.command("EHLO client.test")[0] == 250
        lines = s.read_until_eof(timeout_s=IDLE_S * 10)
    assert s.eof and lines and lines[-1].startswith("421 4.4.2"), lines


def test_activity_and_a_slow_upload_keep_the_session_open(sub: SubmissionCluster) -> None:
    """The idle deadline moves with every command and, inside DATA, every piece of the body.

    (SubmissionProtocol keeps one timer that re-arms itself when it fires before the
    deadline, instead of aiosmtpd's new timer per command.)
    """
    msg = make_message(1024)
    with RawSmtp.connect(sub.nodes[0].smtp_port, LIMITS_CLIENT) as s:
        assert s.reply()[0] == 220
        assert s.command("EHLO client.test")[0] == 250
        for _ in range(4):  # 1.33 idle timeouts of commands, none a timeout apart
            time.sleep(IDLE_S / 3)
            assert s.command("NOOP")[0] == 250
        assert s.command(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert s.command(f"RCPT TO:<{RCPT}>")[0] == 250
        assert s.command("DATA")[0] == 354
        step = len(msg.data) // 4 + 1  # the body: CRLF lines, ending in CRLF
        for i in range(0, len(msg.data), step):  # the upload outlasts the idle timeout
            s.send(msg.data[i : i + step])
            time.sleep(IDLE_S / 3)
        s.send(b".\r\n")
        code, text = s.reply()
        assert code == 250, text
        started = time.monotonic()
        lines = s.read_until_eof(timeout_s=IDLE_S * 10)  # then idle: closed
    assert s.eof and lines and lines[-1].startswith("421 4.4.2"), lines
    assert IDLE_S * 0.9 <= time.monotonic() - started <= IDLE_S * 5
    qid = queue_id_from_reply(text)
    assert qid is not None
    sub.wait_applied_equal()
    assert_acked_once(sub, {msg.message_id: qid})


def test_null_sender_is_accepted(sub: SubmissionCluster) -> None:
    """MAIL FROM:<> (a bounce from elsewhere) is queued with an empty sender."""
    msg = make_message(1024)
    with smtp(sub, "127.0.0.1") as client:
        client.ehlo()
        assert client.mail("<>")[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        code, raw = client.data(msg.data)
    qid = queue_id_from_reply(raw.decode())
    assert code == 250 and qid, (code, raw)
    sub.wait_applied_equal()
    assert_acked_once(sub, {msg.message_id: qid})
    entry = sub.queue_entry(0, qid)
    assert entry is not None and entry["mail_from"] == "", entry


def test_commands_sent_in_plaintext_behind_starttls_are_not_run_inside_tls(
    sub: SubmissionCluster,
) -> None:
    """STARTTLS command injection (Postfix CVE-2011-0411): what a client, or a man in
    the middle, sends in plaintext right behind STARTTLS must not run as if it came
    over TLS."""
    with RawSmtp.connect(sub.nodes[0].smtp_port, OUTSIDE) as raw:
        assert raw.reply()[0] == 220
        assert raw.command("EHLO client.test")[0] == 250
        raw.send(b"STARTTLS\r\nHELP\r\n")
        assert raw.reply()[0] == 220
        assert raw.buf == b"", raw.buf
        tls = sub.tls().wrap_socket(raw.sock, server_hostname="localhost")
        tls.settimeout(10)
        tls.sendall(b"NOOP\r\n")
        first = tls.recv(4096)
        tls.close()
    assert first.startswith(b"250") and b"Supported commands" not in first, first


def test_pipelined_envelope_is_answered_in_order(sub: SubmissionCluster) -> None:
    """PIPELINING (RFC 2920) is offered: MAIL, two RCPTs (one refused) and DATA in one
    write get their four replies in order, and the message is queued once."""
    msg = make_message(700)
    with RawSmtp.connect(sub.nodes[1].smtp_port, PIPELINING_CLIENT) as raw:
        assert raw.reply()[0] == 220
        code, text = raw.command("EHLO client.test")
        assert code == 250 and "PIPELINING" in text, text
        envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nRCPT TO:<bad address>\r\n"
        raw.send(envelope.encode() + b"DATA\r\n")
        replies = [raw.reply()[0] for _ in range(4)]
        assert replies == [250, 250, 501, 354], replies
        raw.send(msg.data + b"\r\n.\r\n")
        code, text = raw.reply(30.0)
    assert code == 250, text
    qid = queue_id_from_reply(text)
    assert qid is not None, text
    check_queued(sub, {msg.message_id: qid}, "ESMTP")
