"""mqnode against a real Postfix on 127.0.0.1: as the receiver it delivers to, and as the
client that relays application mail into it.

Throwaway Postfix instances (bench/postfix.py: their own config, queue and log
under the test's directory, no DNS, no local delivery) relay what they accept
to a recording sink; mqnode runs as real node processes. Receivers: Postfix
with opportunistic STARTTLS and per-recipient refusals (`452 4.2.2`, `550
5.1.1`) and a SIZE limit; Postfix that speaks only TLS 1.0; `smtp-sink -e`,
which refuses EHLO. Client: Postfix relaying mail with a quoted local part, an
address literal, an internationalized domain (SMTPUTF8) and DSN parameters
into mqnode. Bounces mqnode sends are parsed by flufl.bounce (an independent
RFC 3464 parser) and checked field by field. Needs root and Postfix
(scripts/test installs it with apt when it can); skipped with the reason
otherwise. Every wait is a bounded poll.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench import postfix as pf
from tests.support.cluster import FAST_TUNING, Cluster, free_ports
from tests.support.smtp import make_message, submit
from tests.support.smtpsink import Sink, SinkHost, bind_common_port
from tests.support.tlscert import make_cert

_WHY_NOT = pf.available()
pytestmark = [
    pytest.mark.interop,
    pytest.mark.timeout(240),
    pytest.mark.skipif(_WHY_NOT is not None, reason=f"Postfix: {_WHY_NOT}"),
]

T = TypeVar("T")
RETRY = ("--retry-base-s", "1", "--retry-max-s", "2")
RECEIVER_RETRY_S = 120  # the receiver tests read one attempt's outcome
WAIT_S = 45.0
SENDER = "app@sender.test"


def _poll(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got is not None:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


@contextlib.contextmanager
def _reachable_dir(prefix: str) -> Iterator[Path]:
    """A directory the postfix user can reach (pytest's tmp dirs are mode 700): removed
    at the end."""
    path = Path(tempfile.mkdtemp(prefix=f"mq-interop-{prefix}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sinkhost() -> Iterator[SinkHost]:
    with SinkHost() as host:
        yield host


def _sink(host: SinkHost, name: str) -> Sink:
    _, socks = bind_common_port(["127.0.0.1"])
    return host.add(name, socks["127.0.0.1"], smtputf8=True)


def _postfix_tls(base: Path, cert: Any, protocols: str = "") -> dict[str, str]:
    settings = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(cert.cert),
        "smtpd_tls_key_file": str(cert.key),
        "smtpd_tls_loglevel": "1",
    }
    if protocols:  # an old receiver: exactly these protocol versions, any cipher
        settings |= {
            "smtpd_tls_protocols": protocols,
            "smtpd_tls_mandatory_protocols": protocols,
            "smtpd_tls_ciphers": "low",
            "tls_low_cipherlist": "ALL:@SECLEVEL=0",
        }
    return settings


class Receiver:
    """A throwaway Postfix relaying to `sink`, and a 1-node mqnode relaying to it."""

    def __init__(self, postfix: pf.PostfixInstance, sink: Sink, cluster: Cluster) -> None:
        self.postfix, self.sink, self.cluster = postfix, sink, cluster

    def submit(self, rcpts: list[str], data: bytes, sender: str = SENDER) -> str:
        node = self.cluster.nodes[0]
        code, text, qid = submit("127.0.0.1", node.smtp_port, sender, rcpts, data)
        assert code == 250 and qid, (code, text)
        return qid

    def arrived(self, rcpt: str) -> list[Any]:
        return [d for d in self.sink.datas if rcpt in d.rcpts and d.reply.startswith("250")]


def _receiver(tmp: Path, sink: Sink, postfix_extra: dict[str, str]) -> Iterator[Receiver]:
    smtp_port = free_ports(1)[0]
    with pf.throwaway_postfix(
        tmp, smtp_port, sink.address[1], extra_main_cf=postfix_extra
    ) as postfix:
        relay = f"127.0.0.1:{smtp_port}"
        retry = ("--retry-base-s", str(RECEIVER_RETRY_S), "--retry-max-s", str(RECEIVER_RETRY_S))
        with Cluster(tmp / "mq", n=1, extra_args=(*FAST_TUNING, *retry), relay_host=relay) as c:
            yield Receiver(postfix, sink, c)


@pytest.fixture(scope="module")
def receiver(sinkhost: SinkHost) -> Iterator[Receiver]:
    with _reachable_dir("receiver") as tmp:
        yield from _receiver_with_refusals(tmp, sinkhost)


def _receiver_with_refusals(tmp: Path, sinkhost: SinkHost) -> Iterator[Receiver]:
    access = tmp / "rcpt_access"
    access.write_text("full@x.test 452 4.2.2 Mailbox full\ngone@x.test 550 5.1.1 User unknown\n")
    extra = {
        **_postfix_tls(tmp, make_cert(tmp)),
        "smtpd_recipient_restrictions": f"check_recipient_access texthash:{access}, "
        "permit_mynetworks, reject",
        "message_size_limit": "40000",
    }
    yield from _receiver(tmp, _sink(sinkhost, "behind-postfix"), extra)


def _arrival(r: Receiver, rcpt: str) -> Callable[[], list[Any] | None]:
    return lambda: r.arrived(rcpt) or None


def _maillog(inst: pf.PostfixInstance) -> str:
    try:
        return inst.maillog.read_text(errors="replace")
    except OSError:
        return ""


def _dsn_to(sink: Sink, sender: str) -> Message:
    event = _poll(
        f"a bounce to {sender}",
        lambda: next((d for d in sink.delivered() if sender in d.rcpts), None),
    )
    msg = email.message_from_bytes(event.content, policy=email.policy.compat32)
    return msg


def _flufl_failed(msg: Message) -> set[str]:
    from flufl.bounce import scan_message  # an independent RFC 3464 parser

    return {a.decode() for a in scan_message(msg)}


def _status_fields(msg: Message) -> list[dict[str, str]]:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [{k.lower(): str(v) for k, v in b.items()} for b in blocks]


def test_postfix_receives_over_starttls(receiver: Receiver) -> None:
    msg = make_message(2048, mail_from=SENDER, rcpt="ok@x.test")
    receiver.submit(["ok@x.test"], msg.data)
    got = _poll("ok@x.test behind Postfix", lambda: receiver.arrived("ok@x.test") or None)
    assert msg.message_id.encode() in got[0].content
    log = _poll(
        "Postfix to log the TLS session",
        lambda: (
            _maillog(receiver.postfix)
            if "TLS connection established" in _maillog(receiver.postfix)
            else None
        ),
    )
    assert "TLS connection established from" in log


def test_postfix_per_recipient_refusals_defer_or_bounce_each(receiver: Receiver) -> None:
    sender = "refusals@sender.test"
    msg = make_message(1024, mail_from=sender, rcpt="ok2@x.test")
    qid = receiver.submit(["ok2@x.test", "full@x.test", "gone@x.test"], msg.data, sender)
    _poll("ok2@x.test behind Postfix", lambda: receiver.arrived("ok2@x.test") or None)
    bounce = _dsn_to(receiver.sink, sender)
    assert _flufl_failed(bounce) == {"gone@x.test"}, bounce.as_string()[:2000]
    fields = _status_fields(bounce)[1:]
    assert [f["final-recipient"] for f in fields] == ["rfc822; gone@x.test"], fields
    assert fields[0]["action"] == "failed" and fields[0]["status"] == "5.1.1", fields
    assert "550 5.1.1" in fields[0]["diagnostic-code"], fields

    c = receiver.cluster

    def full_deferred() -> dict[str, Any] | None:
        entry = c.queue_entry(0, qid)
        if entry is None:
            return None
        r = next(r for r in entry["recipients"] if r["address"] == "full@x.test")
        return r if r.get("last_reply", "").startswith("452 4.2.2") else None

    rcpt = _poll("full@x.test deferred with Postfix's 4.2.2", full_deferred)
    assert rcpt["state"] == "pending" and int(rcpt["attempts"]) == 1, rcpt
    # One attempt (the next is RECEIVER_RETRY_S away), one refusal: a 4.2.2 is not the
    # host's recipient limit, which would have offered it again at once.
    refusals = _maillog(receiver.postfix).count("<full@x.test>: Recipient address rejected")
    assert refusals == 1, refusals


def test_a_message_over_postfixs_size_limit_bounces_unsent(receiver: Receiver) -> None:
    sender = "big@sender.test"
    msg = make_message(60_000, mail_from=sender, rcpt="ok3@x.test")
    receiver.submit(["ok3@x.test"], msg.data, sender)
    bounce = _dsn_to(receiver.sink, sender)
    assert _flufl_failed(bounce) == {"ok3@x.test"}
    fields = _status_fields(bounce)[1]
    assert fields["status"] == "5.3.4", fields
    assert not receiver.arrived("ok3@x.test")


def test_a_tls_1_0_only_postfix_gets_the_mail_encrypted(sinkhost: SinkHost) -> None:
    sink = _sink(sinkhost, "behind-tls10")
    with _reachable_dir("tls10") as tmp:
        extra = _postfix_tls(tmp, make_cert(tmp), protocols="TLSv1")
        for r in _receiver(tmp, sink, extra):
            msg = make_message(1024, mail_from=SENDER, rcpt="old@x.test")
            r.submit(["old@x.test"], msg.data)
            _poll("old@x.test behind a TLS 1.0 Postfix", _arrival(r, "old@x.test"))
            log = _maillog(r.postfix)
            assert "TLSv1 with cipher" in log, log[-2000:]


def test_a_receiver_that_refuses_ehlo_gets_helo() -> None:
    """smtp-sink -e: no ESMTP, EHLO refused (Postfix's own test server)."""
    with _reachable_dir("ehlo") as tmp:
        _helo_only(tmp)


def _helo_only(tmp: Path) -> None:
    port = free_ports(1)[0]
    dump = tmp / "dump"
    dump.mkdir()
    os.chmod(dump, 0o777)  # smtp-sink drops to an unprivileged user
    argv = [pf.which("smtp-sink"), "-e", "-d", f"{dump}/%H%M%S.", "-4", f"127.0.0.1:{port}", "16"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pf.wait_smtp_banner(port, 10.0, proc)
        relay = f"127.0.0.1:{port}"
        args = (*FAST_TUNING, *RETRY)
        with Cluster(tmp / "mq", n=1, extra_args=args, relay_host=relay) as c:
            msg = make_message(1024, mail_from=SENDER, rcpt="helo@x.test")
            node = c.nodes[0]
            code, text, _ = submit("127.0.0.1", node.smtp_port, SENDER, ["helo@x.test"], msg.data)
            assert code == 250, (code, text)

            def dumped() -> bool | None:
                files = [p for p in dump.rglob("*") if p.is_file()]
                found = any(msg.message_id.encode() in p.read_bytes() for p in files)
                return True if found else None

            _poll("smtp-sink -e to take the message", dumped)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client_side() -> Iterator[tuple[pf.PostfixInstance, Cluster]]:
    """mqnode (delivery off: the queue is what we read) behind a Postfix that relays to it."""
    with _reachable_dir("client") as tmp, Cluster(tmp / "mq", n=1, extra_args=FAST_TUNING) as c:
        port = free_ports(1)[0]
        extra = {"smtputf8_enable": "yes", "smtpd_relay_restrictions": "permit_mynetworks, reject"}
        with pf.throwaway_postfix(tmp, port, c.nodes[0].smtp_port, extra_main_cf=extra) as inst:
            yield inst, c


def test_postfix_relays_quoted_literal_and_idn_addresses_into_mqnode(
    client_side: tuple[pf.PostfixInstance, Cluster],
) -> None:
    inst, c = client_side
    rcpts = ['"john smith"@example.test', "user@[192.0.2.4]", "jöran@bücher.test"]
    body = (
        "From: app@sender.test\r\nTo: many\r\nSubject: Grüße\r\n"
        "Message-ID: <interop-addresses@sender.test>\r\n\r\nhello\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", inst.smtp_port, timeout=30) as s:
        s.ehlo("app.sender.test")
        s.sendmail(SENDER, rcpts, body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])

    def queued() -> list[dict[str, Any]] | None:
        msgs = [
            m
            for m in c.queue_messages(0)
            if m.get("message_id") == "<interop-addresses@sender.test>"
        ]
        return msgs or None

    msgs = _poll("Postfix to relay the message into mqnode", queued)
    got = sorted(r["address"] for m in msgs for r in c.queue_entry(0, m["id"])["recipients"])
    assert got == sorted(rcpts), (got, _maillog(inst)[-3000:])
    assert "status=bounced" not in _maillog(inst)


def test_postfix_passes_dsn_parameters_through_to_mqnode(
    client_side: tuple[pf.PostfixInstance, Cluster],
) -> None:
    inst, c = client_side
    body = (
        b"From: app@sender.test\r\nTo: dsn@example.test\r\nSubject: dsn\r\n"
        b"Message-ID: <interop-dsn@sender.test>\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP("127.0.0.1", inst.smtp_port, timeout=30) as s:
        s.ehlo("app.sender.test")
        s.sendmail(
            SENDER,
            ["dsn@example.test"],
            body,
            mail_options=["RET=HDRS", "ENVID=interop-42"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;dsn@example.test"],
        )

    def entry() -> dict[str, Any] | None:
        for m in c.queue_messages(0):
            if m.get("message_id") == "<interop-dsn@sender.test>":
                return c.queue_entry(0, m["id"])
        return None

    e = _poll("the DSN message in mqnode", entry)
    text = str(e)
    assert "interop-42" in text and "HDRS" in text.upper(), e
    assert "SUCCESS" in text.upper(), e


# What Postfix's cleanup always does to a message's header section, checked side by side.
SHAPES = {
    "blind": b"From: app@sender.test\r\nTo: a@x.test\r\nBcc: hidden@x.test,\r\n other@x.test\r\n"
    b"Return-Path: <forged@x.test>\r\nContent-Length: 3\r\nSubject: s\r\n\r\nhello\r\n",
    "no-empty-line": b"From: app@sender.test\r\nSubject: s\r\nhello, a body line\r\n",
    "no-header": b"hello, no header at all\r\n",
}
BODIES = {
    "blind": b"hello\r\n",
    "no-empty-line": b"hello, a body line\r\n",
    "no-header": b"hello, no header at all\r\n",
}


@contextlib.contextmanager
def _side_by_side(host: SinkHost, name: str) -> Iterator[tuple[list[int], list[Sink]]]:
    """A throwaway Postfix and a 1-node mqnode, each relaying to a sink of its own:
    ([Postfix's SMTP port, mqnode's], [Postfix's sink, mqnode's])."""
    sinks = [_sink(host, f"postfix-{name}"), _sink(host, f"mqnode-{name}")]
    with _reachable_dir(name) as tmp:
        port = free_ports(1)[0]
        with (
            pf.throwaway_postfix(tmp, port, sinks[0].address[1]),
            Cluster(tmp / "mq", n=1, extra_args=FAST_TUNING,
                    relay_host=f"127.0.0.1:{sinks[1].address[1]}") as c,
        ):  # fmt: skip
            yield [port, c.nodes[0].smtp_port], sinks


def test_header_sections_come_out_as_postfix_sends_them(sinkhost: SinkHost) -> None:
    """The same messages into a Postfix and into mqnode, each relaying to a sink: both
    send them without Bcc, Return-Path and Content-Length fields, and with the body
    after an empty line where the client's header section ended without one."""
    with _side_by_side(sinkhost, "shapes") as (ports, sinks):
        for name, data in SHAPES.items():
            for into in ports:
                code, text, _ = submit("127.0.0.1", into, SENDER, [f"{name}@x.test"], data)
                assert code == 250, (name, code, text)
        for sink in sinks:
            _poll(f"{sink} to get every shape", lambda s=sink: len(s.delivered()) >= 3 or None)
    for sink in sinks:
        for name in SHAPES:
            (event,) = [d for d in sink.delivered() if f"{name}@x.test" in d.rcpts]
            msg = email.message_from_bytes(event.content, policy=email.policy.compat32)
            for field in ("Bcc", "Return-Path", "Content-Length"):
                assert msg.get_all(field) is None, (sink, name, field, event.content)
            assert msg.defects == [], (sink, name, msg.defects)
            assert event.content.split(b"\r\n\r\n", 1)[1] == BODIES[name], (sink, name)


def test_a_recipient_named_twice_goes_once_as_postfix_sends_it(sinkhost: SinkHost) -> None:
    """RCPT TO the same address four times (in other cases too) and another once: Postfix
    and mqnode each send one transaction to the two addresses."""
    rcpts = ["b@x.test", "b@x.test", "B@x.test", "b@X.TEST", "c@x.test"]
    with _side_by_side(sinkhost, "dups") as (ports, sinks):
        for into in ports:
            code, text, _ = submit("127.0.0.1", into, SENDER, rcpts, make_message(200).data)
            assert code == 250, text
        for sink in sinks:
            _poll(f"{sink} to get the message", lambda s=sink: s.delivered() or None)
        time.sleep(1.0)  # a second copy would come at once
    for sink in sinks:
        (event,) = sink.delivered()
        assert sorted(r.lower() for r in event.rcpts) == ["b@x.test", "c@x.test"], (sink, event)
