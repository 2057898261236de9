"""Issue 4 end to end: a real 3-node cluster delivers to real SMTP sinks found by real DNS.

Everything is on 127.0.0.0/8: one in-process dnspython server (tests/support/
dnsserver.py) answers for the *.test domains below, and scriptable recording
sinks (tests/support/smtpsink.py) listen on 127.0.0.2, .3, ... all on one
port, the nodes' `--delivery-port`. 127.0.0.4 is an MX host where nothing
listens (connection refused). Each node gets its own `--hostname`
(n1.mqnode.test ...), so the EHLO name a sink saw says which node delivered
and the Received header says which node accepted.

Two parts:
* `TestDelivery`: one cluster (class scope) to which every routing/bounce
  scenario is submitted up front, so their deliveries and retries overlap;
  each test then checks its own scenario. The SERVFAIL scenario is first: the
  resolver caches a temporary DNS failure for 30 s (mqnode/delivery/mx.py
  `temp_fail_ttl_s`, not a node flag), so its recovery is the long wait and
  the others finish meanwhile.
  It also covers STARTTLS (opportunistic, and required per domain) and the
  agent's session reuse (fewer connections than messages, idle sessions
  closed, a session the server dropped not used).
* Lease/failover: fresh clusters with `--lease-ms 1500` and
  `--delivery-concurrency 4` delivering to a sink that answers the final "."
  after 1 s (the message is recorded when the "." arrives, before the reply,
  as a real MTA commits before answering). SIGSTOP of the leader past its
  lease, and kill -9 of the leader, while deliveries are in flight. Duplicates
  are counted by Message-ID; steady state must have none, a leader change at
  most C. A second SIGSTOP hits the leader while its transactions wait for
  RCPT replies (before the final "."): on SIGCONT its lease gate must drop
  them, so it completes nothing. The measured counts are printed
  (`pytest -rP` shows them).

No timing assertions: every wait is a bounded poll whose failure message says
what was expected, what was seen and the tail of each node's log.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import select
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.chaos import post_json
from tests.support.cli import RunCli
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.dnsserver import DnsServer
from tests.support.events import read_events
from tests.support.smtp import make_message, submit
from tests.support.smtpsink import (
    IDLE_TIMEOUT_S,
    DataEvent,
    Sink,
    SinkHost,
    bind_common_port,
    self_signed_tls,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T = TypeVar("T")

C = 4  # --delivery-concurrency of the lease clusters: the duplicate bound per leader change
SLOW_REPLY_S = 1.0
SLOWER_REPLY_S = 4.0  # room to hold a message claimed while another holds the only slot
REUSE_REPLY_S = 0.5
REUSE_MESSAGES = 24  # to one destination; over twice the default per-destination limit of 10
PER_DESTINATION = 10  # the default per_destination_concurrency
IDLE_CLOSE_S = 1.0  # below the node's idle time for parked sessions (10 s)
RETRY_ARGS = ("--retry-base-s", "1", "--retry-max-s", "2")
DELIVERY_WAIT_S = 45.0
SERVFAIL_WAIT_S = 75.0  # 30 s cached temp_fail, then a retry 1-2 s later, with slack

SINK_HOSTS = {
    "mx-a": "127.0.0.2",
    "mx-b": "127.0.0.3",
    "nomx": "127.0.0.5",
    "perm": "127.0.0.6",
    "temp": "127.0.0.7",
    "senders": "127.0.0.8",
    "refuse": "127.0.0.10",
    "fixed": "127.0.0.11",
    "tls": "127.0.0.12",  # offers STARTTLS (self-signed certificate)
    "plain": "127.0.0.13",  # does not offer STARTTLS; first MX of a TLS-required domain
    "reuse": "127.0.0.14",  # answers the final "." after REUSE_REPLY_S
    "idle": "127.0.0.15",  # closes a connection idle for IDLE_CLOSE_S
    "slow": "127.0.0.20",  # answers the final "." after SLOW_REPLY_S
    "gate": "127.0.0.21",  # answers every RCPT after SLOW_REPLY_S
    "slower": "127.0.0.22",  # answers the final "." after SLOWER_REPLY_S
    "utf8": "127.0.0.23",  # offers SMTPUTF8 (RFC 6531)
}
DEAD_HOST = "127.0.0.4"  # an MX host with nothing listening: connection refused

USER_UNKNOWN = "550 5.1.1 <bad@perm.test>: Recipient address rejected: User unknown"
MAILBOX_BUSY = "450 4.2.1 <busy@perm.test>: Mailbox busy, try again later"
TRY_LATER = "451 4.3.0 Temporary local problem, try again later"
TLS_REQUIRED = "tlsreq.test"


def zones(servfail_fixed: bool, tlsreq_host: str = SINK_HOSTS["plain"]) -> dict[str, Any]:
    def mx_to(host: str) -> dict[str, Any]:
        return {"MX": [[10, host]]}

    return {
        # listed worst-first: the node must sort by preference, not take the first
        "pref.test": {"MX": [[20, "mx-b.pref.test"], [10, "mx-a.pref.test"]]},
        "mx-a.pref.test": {"A": [SINK_HOSTS["mx-a"]]},
        "mx-b.pref.test": {"A": [SINK_HOSTS["mx-b"]]},
        "fallback.test": {"MX": [[10, "dead.fallback.test"], [20, "mx-b.pref.test"]]},
        "dead.fallback.test": {"A": [DEAD_HOST]},
        "nomx.test": {"A": [SINK_HOSTS["nomx"]]},
        "nullmx.test": {"MX": [[0, "."]]},
        "perm.test": mx_to("mx.perm.test"),
        "mx.perm.test": {"A": [SINK_HOSTS["perm"]]},
        "temp.test": mx_to("mx.temp.test"),
        "mx.temp.test": {"A": [SINK_HOSTS["temp"]]},
        "senders.test": mx_to("mx.senders.test"),
        "mx.senders.test": {"A": [SINK_HOSTS["senders"]]},
        "refuse.test": mx_to("mx.refuse.test"),
        "mx.refuse.test": {"A": [SINK_HOSTS["refuse"]]},
        "servfail.test": mx_to("mx.servfail.test") if servfail_fixed else "SERVFAIL",
        "mx.servfail.test": {"A": [SINK_HOSTS["fixed"]]},
        "tls.test": mx_to("mx.tls.test"),
        "mx.tls.test": {"A": [SINK_HOSTS["tls"]]},
        # TTL 1: when the test points mx.tlsreq.test at a TLS host, the next retry sees it
        "tlsreq.test": {"MX": [[10, "mx.tlsreq.test"]], "TTL": 1},
        "mx.tlsreq.test": {"A": [tlsreq_host], "TTL": 1},
        "idle.test": mx_to("mx.idle.test"),
        "mx.idle.test": {"A": [SINK_HOSTS["idle"]]},
        "reuse.test": mx_to("mx.reuse.test"),
        "mx.reuse.test": {"A": [SINK_HOSTS["reuse"]]},
        "slow.test": mx_to("mx.slow.test"),
        "mx.slow.test": {"A": [SINK_HOSTS["slow"]]},
        "gate.test": mx_to("mx.gate.test"),
        "mx.gate.test": {"A": [SINK_HOSTS["gate"]]},
        "utf8.test": mx_to("mx.utf8.test"),
        "mx.utf8.test": {"A": [SINK_HOSTS["utf8"]]},
        "slower.test": mx_to("mx.slower.test"),
        "mx.slower.test": {"A": [SINK_HOSTS["slower"]]},
        # nosuch.test is absent: NXDOMAIN
    }


class NamedCluster(Cluster):
    """A Cluster whose node i says `--hostname n<i+1>.mqnode.test` (EHLO, Received, DSN)."""

    def command(self, i: int) -> list[str]:
        return [*super().command(i), "--hostname", hostname(self, i)]


def hostname(c: Cluster, i: int) -> str:
    return f"{c.nodes[i].node_id}.mqnode.test"


@dataclass
class Env:
    dns: DnsServer
    sinks: dict[str, Sink]
    port: int
    tls_ca: Path  # the "tls" sink's self-signed certificate

    @property
    def dns_addr(self) -> str:
        return f"{self.dns.host}:{self.dns.port}"

    def cluster(self, base: Path, *extra: str) -> NamedCluster:
        args = (*FAST_TUNING, "--delivery-port", str(self.port), *extra)
        return NamedCluster(base, n=3, extra_args=args, dns_server=self.dns_addr)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    port, socks = bind_common_port(list(SINK_HOSTS.values()))
    tls_dir = tmp_path_factory.mktemp("tls")
    # Also the MX host of the TLS-required domain once the test points it here: that mail
    # is only sent to a host whose certificate verifies (--tls-required-ca-file) and names it.
    tls = self_signed_tls(tls_dir, "mx.tls.test", also=["mx.tlsreq.test"])
    with DnsServer(zones(servfail_fixed=False)) as dns, SinkHost() as host:
        sinks = {
            name: host.add(
                name,
                socks[ip],
                reply_delay_s={
                    "slow": SLOW_REPLY_S,
                    "reuse": REUSE_REPLY_S,
                    "slower": SLOWER_REPLY_S,
                }.get(name, 0.0),
                rcpt_delay_s=SLOW_REPLY_S if name == "gate" else 0.0,
                tls_context=tls if name == "tls" else None,
                idle_timeout_s=IDLE_CLOSE_S if name == "idle" else IDLE_TIMEOUT_S,
                smtputf8=name == "utf8",
            )
            for name, ip in SINK_HOSTS.items()
        }
        sinks["perm"].script_rcpt("bad@perm.test", USER_UNKNOWN)
        sinks["perm"].script_rcpt("busy@perm.test", MAILBOX_BUSY, "250 2.1.5 Ok")
        sinks["temp"].script_data("later@temp.test", TRY_LATER, "250 2.0.0 Ok: recorded")
        sinks["refuse"].script_rcpt("*", "550 5.7.1 Service unavailable; we accept no mail")
        yield Env(dns, sinks, port, tls_dir / "mx.tls.test.crt")


# -- helpers ---------------------------------------------------------------------------------


def poll(c: Cluster, what: str, probe: Callable[[], tuple[T | None, str]], timeout_s: float) -> T:
    """Cluster.poll: bounded, checks the nodes are alive, fails with their logs."""
    return c.poll(what, probe, timeout_s)


def submit_ok(c: Cluster, i: int, mail_from: str, rcpts: Sequence[str], data: bytes) -> str:
    code, text, qid = submit("127.0.0.1", c.nodes[i].smtp_port, mail_from, list(rcpts), data)
    if code != 250 or not qid:
        raise c.fail(f"{c.nodes[i].node_id} answered {code} {text!r} for {rcpts}")
    return qid


def submit_smtputf8(port: int, mail_from: str, rcpts: list[str], body: bytes) -> tuple[int, str]:
    """One message with MAIL FROM ... SMTPUTF8 (smtplib sends UTF-8 commands then)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, local_hostname="client.test") as client:
        client.ehlo()
        try:
            client.sendmail(mail_from, rcpts, body, mail_options=["SMTPUTF8"])
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return code, text.decode(errors="replace")
    return 250, "ok"


def accepted_for(sinks: Sequence[Sink], rcpt: str) -> list[DataEvent]:
    return [d for s in sinks for d in s.delivered() if rcpt in d.rcpts]


def wait_delivered(
    c: Cluster, sinks: Sequence[Sink], rcpt: str, timeout_s: float = DELIVERY_WAIT_S
) -> list[DataEvent]:
    def probe() -> tuple[list[DataEvent] | None, str]:
        got = accepted_for(sinks, rcpt)
        seen = {s.name: [(d.rcpts, d.reply) for d in s.datas][-3:] for s in sinks}
        return (got or None), f"no accepted DATA for {rcpt}; last DATAs {seen}"

    names = [s.name for s in sinks]
    return poll(c, f"a delivery to {rcpt} at {names}", probe, timeout_s)


def dsns_to(sink: Sink, sender: str) -> list[DataEvent]:
    return [d for d in sink.delivered() if sender in d.rcpts]


def wait_dsn(c: Cluster, sink: Sink, sender: str) -> DataEvent:
    def probe() -> tuple[DataEvent | None, str]:
        got = dsns_to(sink, sender)
        return (got[0] if got else None), f"{sink.name} got {[d.rcpts for d in sink.datas]}"

    return poll(c, f"a bounce to {sender} at {sink.name}", probe, DELIVERY_WAIT_S)


def parse_dsn(content: bytes) -> tuple[EmailMessage, Message, dict[str, Message]]:
    """(the report, its per-message block, per-recipient blocks by Final-Recipient address)."""
    report = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status", report["Content-Type"]
    parts = _messages(report.get_payload())
    status_parts = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    assert len(status_parts) == 1, [p.get_content_type() for p in parts]
    blocks = _messages(status_parts[0].get_payload())
    assert len(blocks) >= 2, blocks
    per_rcpt: dict[str, Message] = {}
    for block in blocks[1:]:
        kind, _, addr = str(block["Final-Recipient"]).partition(";")
        assert kind.strip().lower() == "rfc822", block["Final-Recipient"]
        per_rcpt[addr.strip()] = block
    return report, blocks[0], per_rcpt


def _messages(payload: object) -> list[Message]:
    assert isinstance(payload, list), f"expected sub-parts, got {type(payload).__name__}"
    assert all(isinstance(p, Message) for p in payload), payload
    return payload


def returned_message_id(report: EmailMessage) -> str | None:
    """Message-ID of the returned original (message/rfc822 or text/rfc822-headers part)."""
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            return str(_messages(part.get_payload())[0]["Message-ID"])
        if ctype == "text/rfc822-headers":
            text = part.get_payload(decode=True)
            assert isinstance(text, bytes), type(text)
            match = re.search(rb"(?im)^message-id:\s*(\S+)", text)
            return match.group(1).decode() if match else None
    return None


def header_block(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def message_without_id(rcpt: str) -> bytes:
    return (
        f"From: temp@senders.test\r\nTo: {rcpt}\r\nSubject: no Message-ID here\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        "The node must add a Message-ID, the same one on every attempt.\r\n"
        ".a line that starts with a dot survives dot-stuffing\r\n"
    ).encode()


def node_logs(c: Cluster) -> str:
    return "\n".join(n.log_path.read_text(encoding="utf-8", errors="replace") for n in c.nodes)


def node_log(c: Cluster, host: str) -> str:
    node = next(n for i, n in enumerate(c.nodes) if hostname(c, i) == host)
    return node.log_path.read_text(encoding="utf-8", errors="replace")


def wait_queues_empty(c: Cluster, timeout_s: float = 30.0) -> None:
    """Every live node has applied the same log and holds no message at all."""
    c.wait_applied_equal(timeout_s)

    def probe() -> tuple[bool | None, str]:
        left = {c.nodes[i].node_id: c.queue_messages(i) for i in c.live_indexes()}
        summary = {
            k: [(m["id"], [r["address"] for r in m["recipients"]], m["state"]) for m in v][:5]
            for k, v in left.items()
        }
        return (True if not any(left.values()) else None), f"still queued: {summary}"

    poll(c, "an empty queue on every live node", probe, timeout_s)


# -- routing, retries, bounces, headers: one cluster --------------------------------------------


@dataclass(frozen=True)
class Sent:
    qid: str
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes
    message_id: str | None  # None: submitted without one


SCENARIOS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (envelope sender, recipients)
    "servfail": ("servfail@senders.test", ("user@servfail.test",)),
    "pref": ("pref@senders.test", ("user@pref.test",)),
    "fallback": ("fallback@senders.test", ("user@fallback.test",)),
    "nomx": ("nomx@senders.test", ("user@nomx.test",)),
    "nullmx": ("nullmx@senders.test", ("user@nullmx.test",)),
    "nxdomain": ("nx@senders.test", ("user@nosuch.test",)),
    "temp": ("temp@senders.test", ("later@temp.test",)),
    "perm": (
        "perm@senders.test",
        (
            "good@perm.test",  # 250
            "bad@perm.test",  # 550 at RCPT
            "busy@perm.test",  # 450 at RCPT, then 250 on the retry
            "ok@pref.test",  # another domain, 250
            "gone@nosuch.test",  # another domain, NXDOMAIN
        ),
    ),
    "tls": ("tls@senders.test", ("user@tls.test",)),
    "tlsreq": ("tlsreq@senders.test", (f"user@{TLS_REQUIRED}",)),
    "refused_bounce": ("carol@refuse.test", ("other@nullmx.test",)),
}


@dataclass
class Shared:
    c: Cluster
    env: Env
    sent: dict[str, Sent]


@pytest.fixture(scope="class")
def shared(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    env.dns.set_zones(zones(servfail_fixed=False))
    base = tmp_path_factory.mktemp("delivery")
    tls = ("--tls-required-domains", TLS_REQUIRED, "--tls-required-ca-file", str(env.tls_ca))
    with env.cluster(base, *RETRY_ARGS, *tls) as c:
        sent: dict[str, Sent] = {}
        for k, (name, (mail_from, rcpts)) in enumerate(SCENARIOS.items()):
            if name == "temp":
                data, mid = message_without_id(rcpts[0]), None
            else:
                msg = make_message(2048, mail_from=mail_from, rcpt=rcpts[0], subject=name)
                data, mid = msg.data, msg.message_id
            qid = submit_ok(c, k % 3, mail_from, rcpts, data)
            sent[name] = Sent(qid, mail_from, rcpts, data, mid)
        for k in range(REUSE_MESSAGES):
            mail_from, rcpt = "reuse@senders.test", f"r{k}@reuse.test"
            msg = make_message(1024, mail_from=mail_from, rcpt=rcpt, subject="reuse")
            qid = submit_ok(c, k % 3, mail_from, [rcpt], msg.data)
            sent[f"reuse-{k}"] = Sent(qid, mail_from, (rcpt,), msg.data, msg.message_id)
        yield Shared(c, env, sent)


@pytest.mark.usefixtures("shared")
class TestDelivery:
    def test_servfail_defers_then_delivers_once_dns_is_fixed(self, shared: Shared) -> None:
        c, s = shared.c, shared.sent["servfail"]

        def deferred_everywhere() -> tuple[dict[str, Any] | None, str]:
            entries = {c.nodes[i].node_id: c.queue_entry(i, s.qid) for i in c.live_indexes()}
            ok = all(
                e is not None
                and e["state"] == "deferred"
                and "DNS" in e["recipients"][0]["last_reply"]
                for e in entries.values()
            )
            first = next(iter(entries.values()))
            return (first if ok else None), f"entries: {entries}"

        entry = poll(c, f"{s.qid} deferred on every node, naming DNS", deferred_everywhere, 30)
        reply = entry["recipients"][0]["last_reply"]
        assert reply.startswith("4.4.3"), reply
        assert "SERVFAIL" in reply or "NoNameservers" in reply, reply
        assert entry["recipients"][0]["state"] == "pending", entry
        assert not shared.env.sinks["fixed"].datas, "nothing may be sent while DNS fails"

        shared.env.dns.set_zones(zones(servfail_fixed=True))
        got = wait_delivered(c, [shared.env.sinks["fixed"]], "user@servfail.test", SERVFAIL_WAIT_S)
        assert len(got) == 1 and got[0].message_id == s.message_id, got
        attempts = len(re.findall(rf"{s.qid}: to=<\S+> deferred", node_logs(c)))
        queries = shared.env.dns.query_count("servfail.test", "MX")
        print(f"servfail: {attempts} deferred attempts, {queries} MX queries before delivery")
        assert not dsns_to(shared.env.sinks["senders"], s.mail_from), "a deferral is no bounce"

    def test_best_preference_mx_gets_the_mail(self, shared: Shared) -> None:
        sinks = shared.env.sinks
        got = wait_delivered(shared.c, [sinks["mx-a"], sinks["mx-b"]], "user@pref.test")
        assert [d.sink for d in got] == ["mx-a"], "preference 10 (mx-a) beats 20 (mx-b)"
        assert not [r for r in sinks["mx-b"].rcpts if r.address == "user@pref.test"]

    def test_fallback_to_next_mx_when_the_first_refuses_connections(self, shared: Shared) -> None:
        sinks = shared.env.sinks
        qid = shared.sent["fallback"].qid
        got = wait_delivered(shared.c, [sinks["mx-b"]], "user@fallback.test")
        assert len(got) == 1, got
        deferrals = re.findall(rf"{qid}: to=<\S+> deferred: .*", node_logs(shared.c))
        assert not deferrals, f"the refused first MX must not defer the message: {deferrals}"

    def test_a_record_fallback_when_the_domain_has_no_mx(self, shared: Shared) -> None:
        got = wait_delivered(shared.c, [shared.env.sinks["nomx"]], "user@nomx.test")
        assert len(got) == 1 and got[0].message_id == shared.sent["nomx"].message_id, got

    @pytest.mark.parametrize(
        ("name", "rcpt", "status"),
        [("nullmx", "user@nullmx.test", "5.1.10"), ("nxdomain", "user@nosuch.test", "5.1.2")],
    )
    def test_null_mx_and_nxdomain_bounce_at_once(
        self, shared: Shared, name: str, rcpt: str, status: str
    ) -> None:
        s = shared.sent[name]
        dsn = wait_dsn(shared.c, shared.env.sinks["senders"], s.mail_from)
        assert dsn.mail_from == "", f"bounces go out with MAIL FROM:<>, got {dsn.mail_from!r}"
        report, _, per_rcpt = parse_dsn(dsn.content)
        assert list(per_rcpt) == [rcpt], per_rcpt.keys()
        assert (per_rcpt[rcpt]["Action"], per_rcpt[rcpt]["Status"]) == ("failed", status)
        assert returned_message_id(report) == s.message_id
        rcpt_events = [r for sink in shared.env.sinks.values() for r in sink.rcpts]
        assert not [r for r in rcpt_events if r.address == rcpt], "never offered to any host"

    def test_temporary_failure_then_success_with_a_stable_added_message_id(
        self, shared: Shared
    ) -> None:
        c, s, sink = shared.c, shared.sent["temp"], shared.env.sinks["temp"]
        wait_delivered(c, [sink], "later@temp.test")
        attempts = [d for d in sink.datas if "later@temp.test" in d.rcpts]
        assert [d.reply for d in attempts] == [TRY_LATER, "250 2.0.0 Ok: recorded"], attempts
        first, second = attempts
        assert first.message_id and first.message_id == second.message_id, (
            f"Message-ID changed between attempts: {first.message_id!r} -> {second.message_id!r}"
        )
        assert first.content == second.content, "a retry sends the very same bytes"
        # the id the node added: <queue id @ the accepting node's hostname>
        accepted_by = re.search(rb"by (n\d\.mqnode\.test) \(mqnode\)", first.content)
        assert accepted_by, first.content[:300]
        assert first.message_id == f"<{s.qid}@{accepted_by.group(1).decode()}>"
        assert header_block(first.content).get_all("Message-ID") == [first.message_id]
        assert not dsns_to(shared.env.sinks["senders"], s.mail_from), "a 451 is no bounce"

    def test_permanent_failure_bounces_only_the_failed_recipients(self, shared: Shared) -> None:
        c, s, sinks = shared.c, shared.sent["perm"], shared.env.sinks
        dsn = wait_dsn(c, sinks["senders"], s.mail_from)
        good = wait_delivered(c, [sinks["perm"]], "good@perm.test")
        busy = wait_delivered(c, [sinks["perm"]], "busy@perm.test")
        ok = wait_delivered(c, [sinks["mx-a"]], "ok@pref.test")

        assert dsn.mail_from == "", f"the bounce must have the null sender, got {dsn.mail_from!r}"
        assert dsn.rcpts == (s.mail_from,), dsn.rcpts
        report, per_message, per_rcpt = parse_dsn(dsn.content)
        assert sorted(per_rcpt) == ["bad@perm.test", "gone@nosuch.test"], (
            f"exactly the failed recipients are reported: {sorted(per_rcpt)}"
        )
        bad, gone = per_rcpt["bad@perm.test"], per_rcpt["gone@nosuch.test"]
        assert (bad["Action"], bad["Status"]) == ("failed", "5.1.1"), str(bad)
        assert "User unknown" in str(bad["Diagnostic-Code"]), str(bad)
        assert (gone["Action"], gone["Status"]) == ("failed", "5.1.2"), str(gone)
        assert per_message["Reporting-MTA"], str(per_message)
        assert report["To"] and s.mail_from in str(report["To"])
        assert returned_message_id(report) == s.message_id

        # each recipient is tracked on its own: delivered ones are never sent again
        assert len(good) == 1 and good[0].rcpts == ("good@perm.test",), good
        assert len(busy) == 1 and busy[0].rcpts == ("busy@perm.test",), "retry: busy only"
        assert len(ok) == 1 and ok[0].rcpts == ("ok@pref.test",), ok
        assert good[0].message_id == busy[0].message_id == ok[0].message_id == s.message_id
        offered = [(r.address, r.reply) for r in sinks["perm"].rcpts]
        assert offered.count(("bad@perm.test", USER_UNKNOWN)) == 1, f"5xx is final: {offered}"
        assert [a for a, _ in offered].count("busy@perm.test") == 2, offered
        assert ("busy@perm.test", MAILBOX_BUSY) in offered

        def gone_from_queue() -> tuple[bool | None, str]:
            entries = {c.nodes[i].node_id: c.queue_entry(i, s.qid) for i in c.live_indexes()}
            return (True if not any(entries.values()) else None), f"entries {entries}"

        poll(c, f"{s.qid} completed and deleted everywhere", gone_from_queue, 20)
        assert len(dsns_to(sinks["senders"], s.mail_from)) == 1, "one bounce, not one per rcpt"

    def test_utf8_addresses_go_with_smtputf8_or_bounce_5_6_7(self, shared: Shared) -> None:
        """RFC 6531: a UTF-8 envelope is sent with MAIL ... SMTPUTF8 to a host that offers
        it; to one that does not, it cannot be sent and bounces with 5.6.7 (as Postfix
        does), instead of crashing the attempt and retrying it every scan."""
        c, sinks = shared.c, shared.env.sinks
        sender = "jöran-utf8@senders.test"
        body = make_message(512, mail_from=sender, rcpt="søren@utf8.test").data
        code, text = submit_smtputf8(c.nodes[0].smtp_port, sender, ["søren@utf8.test"], body)
        assert code == 250, (code, text)
        got = wait_delivered(c, [sinks["utf8"]], "søren@utf8.test")
        assert got[0].mail_from == sender, got[0]
        assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(got[0].mail_options), got[0].mail_options

        ascii_sender, rcpt = "utf8-bounce@senders.test", "åsa@perm.test"  # perm: no SMTPUTF8
        body = make_message(512, mail_from=ascii_sender, rcpt=rcpt).data
        code, text = submit_smtputf8(c.nodes[1].smtp_port, ascii_sender, [rcpt], body)
        assert code == 250, (code, text)
        dsn = wait_dsn(c, sinks["senders"], ascii_sender)
        report = email.message_from_bytes(dsn.content, policy=email.policy.default)
        # RFC 6533: a report about a UTF-8 address is a global delivery status
        assert report.get_param("report-type") == "global-delivery-status", dsn.content[:800]
        types = [p.get_content_type() for p in report.walk()]
        assert "message/global-delivery-status" in types, types
        text = dsn.content.decode("utf-8", "replace")
        assert "Status: 5.6.7" in text and "SMTPUTF8" in text, text
        assert "Final-Recipient: utf-8;" in text, text  # RFC 6533 form of a UTF-8 address
        assert not [r for r in sinks["perm"].rcpts if r.address == rcpt], "never offered"
        assert "delivery attempt crashed" not in node_logs(c)

    def test_starttls_is_used_when_offered(self, shared: Shared) -> None:
        got = wait_delivered(shared.c, [shared.env.sinks["tls"]], "user@tls.test")
        assert len(got) == 1 and got[0].tls, f"delivered without STARTTLS: {got}"

    def test_tls_required_domain_defers_until_a_host_offers_tls(self, shared: Shared) -> None:
        c, s, sinks = shared.c, shared.sent["tlsreq"], shared.env.sinks
        rcpt = s.rcpts[0]

        def deferred_for_tls() -> tuple[str | None, str]:
            e = c.queue_entry(c.leader(), s.qid)
            reply = e["recipients"][0]["last_reply"] if e else ""
            ok = e is not None and e["state"] == "deferred" and "TLS is required" in reply
            return (reply if ok else None), f"entry {e}"

        poll(c, f"{s.qid} deferred: TLS required, not offered", deferred_for_tls, 30)
        assert not sinks["plain"].rcpts and not sinks["plain"].datas, "sent without TLS"
        assert sinks["plain"].connections >= 1, "the plain host was never tried"

        shared.env.dns.set_zones(zones(servfail_fixed=True, tlsreq_host=SINK_HOSTS["tls"]))
        got = wait_delivered(c, [sinks["tls"]], rcpt)
        assert len(got) == 1 and got[0].tls, got
        assert not sinks["plain"].datas

    def test_a_host_without_tls_is_disconnected_when_tls_is_required(self, shared: Shared) -> None:
        """The refused host gets QUIT (or at least a closed connection), not a dangling session."""
        c, plain = shared.c, shared.env.sinks["plain"]
        assert plain.connections >= 1, "runs after the TLS-required scenario"

        def closed() -> tuple[bool | None, str]:
            seen = (
                f"{plain.connections} connections, {plain.open_connections} still open, "
                f"{plain.quits} QUIT"
            )
            return (True if plain.open_connections == 0 else None), seen

        poll(c, "the node to close its connections to the host without TLS", closed, 15)

    def test_a_bounce_to_a_refusing_sender_is_not_bounced(self, shared: Shared) -> None:
        c, s, refuse = shared.c, shared.sent["refused_bounce"], shared.env.sinks["refuse"]

        def refused_bounce() -> tuple[bool | None, str]:
            tried = [r for r in refuse.rcpts if r.address == s.mail_from]
            return (True if tried else None), f"RCPTs at refuse: {refuse.rcpts}"

        poll(c, f"the bounce offered to {s.mail_from}", refused_bounce, DELIVERY_WAIT_S)

        def settled() -> tuple[bool | None, str]:
            left = [
                (c.nodes[i].node_id, m["id"], m["mail_from"], m["recipients"])
                for i in c.live_indexes()
                for m in c.queue_messages(i)
                if m["id"] == s.qid or m["mail_from"] == ""
            ]
            return (True if not left else None), f"still queued: {left}"

        # the original and its bounce are final (5xx) everywhere; no bounce is left queued
        poll(c, "no bounce left in any queue", settled, 20)
        tried = [r for r in refuse.rcpts if r.address == s.mail_from]
        assert len(tried) == 1, f"a 5xx to a bounce is final, offered once: {tried}"
        assert tried[0].mail_from == "", tried
        assert not refuse.datas, "no DATA after the 550"
        logs = node_logs(c)
        assert re.search(rf"to=<{re.escape(s.mail_from)}> bounced", logs), "bounce not recorded"
        assert "to=<>" not in logs, "a bounce of the bounce (to the null sender) was queued"

    def test_every_delivery_carries_received_and_the_original_message_id(
        self, shared: Shared
    ) -> None:
        sinks = shared.env.sinks
        checked = 0
        for name, s in shared.sent.items():
            for rcpt in s.rcpts:
                for d in accepted_for(list(sinks.values()), rcpt):
                    head = header_block(d.content)
                    received = head.get_all("Received") or []
                    assert len(received) == 1, f"{name}: Received headers {received}"
                    assert re.search(r"by n\d\.mqnode\.test \(mqnode\)", str(received[0]))
                    assert f"id {s.qid}" in str(received[0]), received[0]
                    assert d.content.startswith(b"Received: "), d.content[:80]
                    if s.message_id is not None:
                        assert d.message_id == s.message_id, (name, d.message_id)
                        assert d.content.endswith(s.data), f"{name}: original bytes altered"
                    else:
                        assert d.content.endswith(b"\r\nMessage-ID: " + d.message_id.encode()
                                                  + b"\r\n" + s.data), name  # fmt: skip
                    checked += 1
        assert checked >= 6, f"only {checked} deliveries to check"

    def test_one_connection_carries_several_messages_to_a_destination(self, shared: Shared) -> None:
        """Issue 4: "one connection per destination reused for several messages".

        24 messages to one host that answers each final "." after 0.5 s; at most
        10 run at once per destination, so a connection that is reused carries the
        rest: fewer connections than messages. And never more connections than may
        run at once: every session can be parked for the next message (with 4 parked
        at most, each burst closed 6 and opened 6 new ones).
        """
        c, sink = shared.c, shared.env.sinks["reuse"]
        rcpts = [f"r{k}@reuse.test" for k in range(REUSE_MESSAGES)]
        for rcpt in rcpts:
            wait_delivered(c, [sink], rcpt)
        assert len(sink.delivered()) == REUSE_MESSAGES, [d.rcpts for d in sink.datas]
        assert sink.connections < REUSE_MESSAGES, (
            f"{sink.connections} connections for {REUSE_MESSAGES} messages to one destination "
            f"({sink.quits} QUIT): every message opened its own connection"
        )
        assert sink.connections <= PER_DESTINATION, (
            f"{sink.connections} connections ({sink.quits} QUIT) for at most "
            f"{PER_DESTINATION} deliveries at once: sessions closed and reopened"
        )

    def test_idle_parked_sessions_are_closed_by_the_node(self, shared: Shared) -> None:
        """Parked sessions are kept for the agent's idle time (10 s), not until the server
        gives up: a node must not hold idle connections to every host it ever sent to.
        The reuse sink never closes an idle session itself (300 s)."""
        c, sink = shared.c, shared.env.sinks["reuse"]
        for k in range(REUSE_MESSAGES):
            wait_delivered(c, [sink], f"r{k}@reuse.test")

        def all_closed() -> tuple[bool | None, str]:
            idle_s = time.monotonic() - sink.datas[-1].at_s
            seen = (
                f"{sink.connections} connections, {sink.open_connections} still open, "
                f"{sink.quits} QUIT; last delivery {idle_s:.0f}s ago"
            )
            return (True if sink.open_connections == 0 else None), seen

        poll(c, "the node to close its idle sessions (idle time 10 s)", all_closed, 20)

    def test_a_parked_session_the_server_closed_is_not_used(self, shared: Shared) -> None:
        """The server drops the idle session the node parked; the next message still goes
        out on its first attempt (over a new connection), not deferred as "lost connection".
        """
        c, sink = shared.c, shared.env.sinks["idle"]
        first = make_message(1024, rcpt="one@idle.test")
        submit_ok(c, 0, "idle@senders.test", ["one@idle.test"], first.data)
        wait_delivered(c, [sink], "one@idle.test")

        def server_closed() -> tuple[bool | None, str]:
            seen = f"{sink.connections} connections, {sink.open_connections} open"
            return (True if sink.open_connections == 0 else None), seen

        poll(c, "the sink to close the idle parked session", server_closed, 15)
        second = make_message(1024, rcpt="two@idle.test")
        qid = submit_ok(c, 1, "idle@senders.test", ["two@idle.test"], second.data)
        got = wait_delivered(c, [sink], "two@idle.test")
        assert len(got) == 1 and got[0].message_id == second.message_id, got
        deferrals = re.findall(rf"{qid}: to=<two@idle.test> deferred: .*", node_logs(c))
        assert not deferrals, f"deferred over the dead parked session: {deferrals}"
        assert sink.connections == 2, f"{sink.connections} connections for two messages"

    def test_queue_empty_everywhere_and_exactly_one_lease_holder(
        self, shared: Shared, run_cli: RunCli
    ) -> None:
        c = shared.c
        # everything above is final: servfail, pref, fallback, nomx, temp, ok/good delivered,
        # the bounces delivered (or refused); completed messages are deleted on every node
        wait_delivered(c, [shared.env.sinks["fixed"]], "user@servfail.test", SERVFAIL_WAIT_S)
        for sender in ("nullmx@senders.test", "nx@senders.test", "perm@senders.test"):
            wait_dsn(c, shared.env.sinks["senders"], sender)
        wait_queues_empty(c)
        for i in range(3):
            counts = c.status(i)["queue"]
            assert not any(counts.values()), f"{c.nodes[i].node_id}: queue counts {counts}"

        def one_holder() -> tuple[dict[str, Any] | None, str]:
            statuses = {}
            for node in c.nodes:
                out = run_cli("status", "--admin", node.admin_addr, "--json")
                if out.returncode != 0:
                    return None, f"{node.node_id}: exit {out.returncode} {out.stderr.strip()}"
                statuses[node.node_id] = json.loads(out.stdout)
            holders = [k for k, v in statuses.items() if v["lease_held"] is True]
            leaders = [k for k, v in statuses.items() if v["role"] == "leader"]
            seen = {k: (v["role"], v["lease_held"], v["term"]) for k, v in statuses.items()}
            ok = len(holders) == 1 and holders == leaders
            return ({"holder": holders[0]} if ok else None), f"(role, lease_held, term): {seen}"

        found = poll(c, "lease_held on exactly one node, the leader", one_holder, 20)
        assert found["holder"] == c.nodes[c.leader()].node_id


# -- the lease: failover while deliveries are in flight -----------------------------------------


def lease_cluster(env: Env, base: Path) -> NamedCluster:
    return env.cluster(
        base, "--lease-ms", "1500", "--lease-margin-ms", "500",
        "--delivery-concurrency", str(C), *RETRY_ARGS,
    )  # fmt: skip


def submit_batch(c: Cluster, n: int, tag: str, domain: str = "slow.test") -> dict[str, str]:
    """n messages to `domain` over all nodes; Message-ID -> queue id (all acknowledged)."""
    acked: dict[str, str] = {}
    for k in range(n):
        rcpt = f"{tag}-{k}@{domain}"
        msg = make_message(1024, mail_from="load@senders.test", rcpt=rcpt, subject=tag)
        acked[msg.message_id] = submit_ok(c, k % 3, "load@senders.test", [rcpt], msg.data)
    return acked


def copies(sink: Sink, acked: dict[str, str]) -> Counter[str]:
    """Accepted copies per acknowledged Message-ID (0 for those not arrived)."""
    got = Counter(d.message_id for d in sink.delivered() if d.message_id in acked)
    return Counter({mid: got[mid] for mid in acked})


def wait_all_arrived(c: Cluster, sink: Sink, acked: dict[str, str], timeout_s: float) -> None:
    def probe() -> tuple[bool | None, str]:
        counts = copies(sink, acked)
        missing = [acked[mid] for mid, n in counts.items() if n == 0]
        return (True if not missing else None), f"{len(missing)} not arrived: {missing[:8]}"

    poll(c, f"all {len(acked)} acknowledged messages at the sink", probe, timeout_s)


def duplicates(sink: Sink, acked: dict[str, str]) -> dict[str, list[str]]:
    """Message-ID -> EHLO names of the nodes that delivered it, for those that arrived twice+."""
    by_mid: dict[str, list[str]] = {}
    for d in sink.delivered():
        if d.message_id in acked:
            by_mid.setdefault(d.message_id, []).append(d.helo)
    return {mid: helos for mid, helos in by_mid.items() if len(helos) > 1}


def senders_of(sink: Sink, acked: dict[str, str]) -> set[str]:
    return {d.helo for d in sink.delivered() if d.message_id in acked}


def steady_batch(c: Cluster, sink: Sink, n: int, tag: str) -> None:
    """Without faults: each message arrives once, all from one node (the lease holder)."""
    connections = sink.connections
    lead = c.leader()
    term = c.status(lead)["term"]
    acked = submit_batch(c, n, tag)
    wait_all_arrived(c, sink, acked, DELIVERY_WAIT_S)
    wait_queues_empty(c)
    dups = duplicates(sink, acked)
    used = sink.connections - connections
    print(f"{tag}: {n} messages, {len(dups)} duplicated in steady state, {used} new connections")
    now_lead = c.leader()
    now_term = c.status(now_lead)["term"]
    steady = f"(leader, term: {lead}, {term} -> {now_lead}, {now_term})"
    assert not dups, f"duplicates in steady state {steady}: {dups}"
    senders = senders_of(sink, acked)
    assert len(senders) == 1, f"two nodes delivered in steady state {steady}: {senders}"


def wait_in_flight(c: Cluster, sink: Sink, acked: dict[str, str], phase: str) -> None:
    """Mid-batch, with the sink holding replies of the given phase ("dot" or "rcpt")."""

    def probe() -> tuple[bool | None, str]:
        arrived = sum(1 for n in copies(sink, acked).values() if n)
        busy = sink.in_progress if phase == "dot" else sink.rcpt_in_progress
        ok = arrived >= C and busy >= 1 and arrived <= len(acked) - C
        return (True if ok else None), f"{arrived} arrived, {busy} awaiting their {phase} reply"

    poll(c, f"deliveries in flight mid-batch ({phase} phase)", probe, DELIVERY_WAIT_S)


def wait_delivery_by_other(c: Cluster, sink: Sink, acked: dict[str, str], old: str) -> str:
    def probe() -> tuple[str | None, str]:
        others = senders_of(sink, acked) - {old}
        return (min(others) if others else None), f"only {senders_of(sink, acked)} delivered"

    return poll(c, f"a delivery by a node other than {old}", probe, DELIVERY_WAIT_S)


def report(tag: str, sink: Sink, acked: dict[str, str], extra: str = "") -> dict[str, list[str]]:
    dups = duplicates(sink, acked)
    extra_copies = sum(len(h) - 1 for h in dups.values())
    print(
        f"{tag}: {len(acked)} acknowledged, all arrived; {len(dups)} Message-IDs duplicated "
        f"({extra_copies} extra copies), bound C={C}; by node: {sorted(dups.values())} {extra}"
    )
    return dups


def sigstop_failover(
    c: Cluster, sink: Sink, acked: dict[str, str], phase: str
) -> tuple[str, float]:
    """SIGSTOP the leader mid-batch past its lease; a new leader delivers; SIGCONT.

    Returns the old leader's hostname and the time (monotonic) just before SIGCONT.
    """
    old = c.leader()
    wait_in_flight(c, sink, acked, phase)
    c.pause(old)  # deliveries in flight; its 1.5 s lease runs out while it is stopped
    new = c.wait_for_leader(30)
    assert new != old
    other = wait_delivery_by_other(c, sink, acked, hostname(c, old))
    assert other == hostname(c, new), f"delivered by {other}, the leader is {c.nodes[new]}"
    acquired = node_log(c, hostname(c, old)).count("dispatch lease acquired")
    resumed_at = time.monotonic()
    c.resume(old)
    wait_all_arrived(c, sink, acked, DELIVERY_WAIT_S)
    wait_queues_empty(c)
    ex = hostname(c, old)
    late = [d.message_id for d in sink.delivered() if d.helo == ex and d.at_s >= resumed_at]
    if node_log(c, ex).count("dispatch lease acquired") == acquired:  # never leader again
        assert not late, f"the resumed ex-leader completed deliveries without a lease: {late}"
    return ex, resumed_at


def test_sigstop_leader_past_its_lease_duplicates_at_most_c(
    env: Env, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    with lease_cluster(env, tmp_path) as c:
        steady_batch(c, env.sinks["slow"], 8, "steady-before")

        # 1. stopped while its transactions wait for the reply to their final "."
        acked = submit_batch(c, 16, "sigstop-dot")
        old, _ = sigstop_failover(c, env.sinks["slow"], acked, "dot")
        dups = report("sigstop (reply to '.' pending)", env.sinks["slow"], acked, f"(old {old})")
        record_property("sigstop_dot_duplicates", len(dups))
        assert len(dups) <= C, f"{len(dups)} duplicated after one leader change (C={C}): {dups}"
        assert all(len(h) == 2 for h in dups.values()), f"more than two copies: {dups}"

        # the resumed ex-leader must not deliver alongside the new one
        steady_batch(c, env.sinks["slow"], 8, "steady-after")

        # 2. stopped before its final ".": on SIGCONT the lease gate must drop them
        gate = env.sinks["gate"]
        acked = submit_batch(c, 12, "sigstop-rcpt", "gate.test")
        old, _ = sigstop_failover(c, gate, acked, "rcpt")
        dropped = len(re.findall(r"lease lost mid-delivery", node_log(c, old)))
        dups = report("sigstop (RCPT reply pending)", gate, acked, f"(old {old})")
        print(f"  the ex-leader dropped {dropped} transactions before the final '.' (lease gate)")
        record_property("sigstop_rcpt_duplicates", len(dups))
        assert len(dups) <= C, f"{len(dups)} duplicated after one leader change (C={C}): {dups}"


def test_kill_leader_during_delivery_every_acked_message_arrives(
    env: Env, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    sink = env.sinks["slow"]
    with lease_cluster(env, tmp_path) as c:
        acked = submit_batch(c, 16, "kill9")
        old = c.leader()
        wait_in_flight(c, sink, acked, "dot")
        c.kill(old)
        c.wait_for_leader(30)
        wait_all_arrived(c, sink, acked, DELIVERY_WAIT_S)
        wait_queues_empty(c)
        dups = report("kill9", sink, acked, f"(killed {hostname(c, old)})")
        record_property("kill9_duplicates", len(dups))
        assert len(dups) <= C, f"{len(dups)} duplicated after one leader change (C={C}): {dups}"

        c.start_node(old)  # it comes back, catches up, and finds nothing left to send
        wait_queues_empty(c)
        assert duplicates(sink, acked) == dups, "copies arrived after the queue was empty"


# -- the claim window: claimed ahead of a free slot, re-read when one frees ----------------------


def test_a_message_held_while_waiting_for_a_slot_is_not_sent(env: Env, tmp_path: Path) -> None:
    """The dispatcher claims up to CLAIM_AHEAD x delivery_concurrency messages, so a freed
    slot finds its next message claimed. One that waits is re-read when its slot frees:
    a hold given meanwhile is obeyed (not sent, still held), and a release sends it once."""
    sink = env.sinks["slower"]
    events = tmp_path / "events.jsonl"
    with env.cluster(
        tmp_path / "c", "--delivery-concurrency", "1", "--event-log", str(events), *RETRY_ARGS
    ) as c:
        acked = submit_batch(c, 2, "window", domain="slower.test")
        qids = set(acked.values())

        def one_sending_both_claimed() -> tuple[set[str] | None, str]:
            arrived = {d.message_id for d in sink.delivered() if d.message_id in acked}
            claimed = {e["queue_id"] for e in read_events(events) if e["event"] == "claimed"} & qids
            ok = len(arrived) == 1 and claimed == qids
            return (arrived if ok else None), f"arrived {arrived}, claimed {claimed}"

        sending = poll(c, "one message sending, the other claimed", one_sending_both_claimed, 20)
        waiting_mid = next(mid for mid in acked if mid not in sending)
        waiting, lead = acked[waiting_mid], c.leader()
        held = post_json(c, lead, "/queue/hold", {"ids": [waiting]})
        assert held["affected"] == [waiting], held
        first = acked[next(iter(sending))]
        assert c.queue_entry(lead, first) is not None, "the slot freed before the hold committed"

        def first_recorded() -> tuple[bool | None, str]:
            return (True if c.queue_entry(lead, first) is None else None), "first still queued"

        poll(c, "the first message's outcome", first_recorded, SLOWER_REPLY_S + 20)
        time.sleep(1.0)  # the waiting attempt has had its slot and re-read the message
        assert copies(sink, {waiting_mid: waiting})[waiting_mid] == 0, "a held message was sent"
        entry = c.queue_entry(lead, waiting)
        assert entry is not None and entry["state"] == "hold", entry
        post_json(c, lead, "/queue/release", {"ids": [waiting]})
        wait_all_arrived(c, sink, acked, DELIVERY_WAIT_S)
        wait_queues_empty(c)
    assert not duplicates(sink, acked), duplicates(sink, acked)


def test_a_slow_destination_does_not_hold_up_mail_for_another(env: Env, tmp_path: Path) -> None:
    """Three messages wait for the one permit of a destination that takes SLOWER_REPLY_S a
    message; a message for another destination submitted after them still goes at once.
    (A message waiting for its destination's permit used to hold a delivery slot: with
    two slots, the other destination's mail waited two slow deliveries.)"""
    slower, slow = env.sinks["slower"], env.sinks["slow"]
    with env.cluster(
        tmp_path / "c",
        "--delivery-concurrency",
        "2",
        "--per-destination-concurrency",
        "1",
        *RETRY_ARGS,
    ) as c:
        backlog = submit_batch(c, 3, "hol", domain="slower.test")
        other = submit_batch(c, 1, "hol-other", domain="slow.test")
        wait_all_arrived(c, slow, other, 3 * SLOWER_REPLY_S + 20)
        arrived = sum(copies(slower, backlog).values())
        assert arrived <= 1, f"{arrived} slow-destination messages went before the other one"
        wait_all_arrived(c, slower, backlog, DELIVERY_WAIT_S)
        wait_queues_empty(c)
    assert not duplicates(slower, backlog) and not duplicates(slow, other)


def test_mail_behind_a_long_backlog_for_a_slow_destination_goes_at_once(
    env: Env, tmp_path: Path
) -> None:
    """250 messages wait for the one permit of a destination that takes SLOWER_REPLY_S a
    message: more than a dispatch scan reads (200 index entries). A message for another
    destination submitted after them still goes within seconds (a deep scan, once a
    second, reads past the backlog). Before, it waited until the backlog ahead of it
    shrank to what a scan reads: ~(250 - 200) x SLOWER_REPLY_S, over 3 minutes here."""
    slow = env.sinks["slow"]
    with env.cluster(
        tmp_path / "c",
        *("--delivery-concurrency", "2", "--per-destination-concurrency", "1"),
        *RETRY_ARGS,
    ) as c:
        submit_batch(c, 250, "backlog", domain="slower.test")
        other = submit_batch(c, 1, "behind-backlog", domain="slow.test")
        wait_all_arrived(c, slow, other, 6 * SLOW_REPLY_S + 10)
    assert not duplicates(slow, other)


class Blackhole:
    """An MX host that takes TCP connections and never says a word (a firewall that
    drops, a wedged server): a client waits out its timeout. Counts connections."""

    def __init__(self, sock: socket.socket, max_lifetime_s: float = 120.0) -> None:
        self._sock = sock
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_lifetime_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.connections = 0

    def __enter__(self) -> Blackhole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in self._held:
            s.close()
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            ready, _, _ = select.select([self._sock], [], [], 0.1)
            if ready:
                conn, _ = self._sock.accept()
                self._held.append(conn)
                self.connections += 1


def test_an_unreachable_destination_is_suspended_not_waited_out_per_message(
    tmp_path: Path,
) -> None:
    """40 messages for a domain whose only MX never greets: the first attempts wait out
    the 2 s timeout, then the destination is suspended and the rest are deferred at once
    ("4.4.1 delivery temporarily suspended"), as Postfix marks a dead destination. Before,
    every message held a slot and a permit for its own 2 s timeout: 40 connections, 8 s.
    Mail for another destination flows meanwhile."""
    port, socks = bind_common_port(["127.0.0.24", "127.0.0.25"])
    zone = {
        "blackhole.test": {"MX": [[10, "mx.blackhole.test"]]},
        "mx.blackhole.test": {"A": ["127.0.0.24"]},
        "live.test": {"MX": [[10, "mx.live.test"]]},
        "mx.live.test": {"A": ["127.0.0.25"]},
    }
    with DnsServer(zone) as dns, SinkHost() as host, Blackhole(socks["127.0.0.24"]) as hole:
        live = host.add("live", socks["127.0.0.25"])
        args = (
            *FAST_TUNING,
            *("--delivery-port", str(port), "--delivery-timeout-s", "2"),
            *("--retry-base-s", "60", "--retry-max-s", "60"),
        )
        with Cluster(tmp_path / "c", extra_args=args, dns_server=f"{dns.host}:{dns.port}") as c:
            dead = submit_batch(c, 40, "hole", domain="blackhole.test")
            other = submit_batch(c, 3, "live", domain="live.test")
            wait_all_arrived(c, live, other, DELIVERY_WAIT_S)

            def all_deferred() -> tuple[list[str] | None, str]:
                entries = [c.queue_entry(0, q) for q in dead.values()]
                replies = [e["recipients"][0]["last_reply"] for e in entries if e]
                done = len(replies) == len(dead) and all(replies)
                return (replies if done else None), f"{sum(map(bool, replies))} deferred"

            replies = poll(c, "every blackhole.test message deferred", all_deferred, 30.0)
            view = c.status(c.leader())["destinations"]
    assert [d["destination"] for d in view["suspended"]] == ["blackhole.test"], view
    suspended = [r for r in replies if r.startswith("4.4.1 delivery temporarily suspended:")]
    assert hole.connections <= PER_DESTINATION, hole.connections
    assert len(suspended) >= len(dead) - PER_DESTINATION, replies


NARROW_ZONE = {
    "narrow.test": {"MX": [[10, "mx.narrow.test"]]},
    "mx.narrow.test": {"A": ["127.0.0.27"]},
}


@dataclass
class NarrowRun:
    sink: Sink
    acked: dict[str, str]
    logs: str
    view: dict[str, Any]  # the leader's /status "destinations"
    table: str  # `mqnode status` of the leader


def run_narrow_receiver(tmp_path: Path, run_cli: RunCli, *args: str) -> NarrowRun:
    """40 messages to a receiver that serves 2 connections from us at once and greets any
    more with 421 (Postfix's smtpd_client_connection_count_limit), answering each message
    after 0.3 s; `args` for every node."""
    port, socks = bind_common_port(["127.0.0.27"])
    with DnsServer(NARROW_ZONE) as dns, SinkHost() as host:
        sink = host.add("narrow", socks["127.0.0.27"], reply_delay_s=0.3, max_connections=2)
        node_args = (*FAST_TUNING, "--delivery-port", str(port), *RETRY_ARGS, *args)
        dns_addr = f"{dns.host}:{dns.port}"
        with Cluster(tmp_path / "c", extra_args=node_args, dns_server=dns_addr) as c:
            acked = submit_batch(c, 40, "narrow", domain="narrow.test")
            wait_all_arrived(c, sink, acked, DELIVERY_WAIT_S)
            logs = "\n".join(n.log_path.read_text(errors="replace") for n in c.nodes)
            lead = c.leader()
            view = c.status(lead)["destinations"]
            table = run_cli("status", "--admin", c.nodes[lead].admin_addr).stdout
    assert copies(sink, acked) == Counter({mid: 1 for mid in acked})
    assert sink.most_open_connections <= 2
    return NarrowRun(sink, acked, logs, view, table)


def test_a_receiver_that_limits_connections_gets_fewer_sessions_and_no_suspension(
    tmp_path: Path, run_cli: RunCli
) -> None:
    """A 421 drops mqnode's window for the destination to the sessions the receiver
    holds, each delivery raises it again (delivery/feedback.py), so the surplus sessions stay few:
    12 refusals in two runs. With a fixed 10 sessions per destination the same 40
    messages met 160-168 and took twice as long. A 421 never suspends the destination
    (the host answers), and every message arrives once."""
    run = run_narrow_receiver(tmp_path, run_cli)
    # The leader shows the destination narrowed below its limit of 10, nothing suspended.
    assert run.view["suspended_count"] == 0, run.view
    (narrow,) = [d for d in run.view["sessions"] if d["destination"] == "narrow.test"]
    assert narrow["allowed"] < narrow["limit"] == 10, run.view
    table = run.table
    assert re.search(r"destinations +narrow\.test \d+ open, [1-9] of 10 allowed", table), table
    assert "suspended for" not in run.logs
    refused = run.sink.busy_refusals
    assert refused <= 20, f"{refused} sessions refused with 421"


def test_a_destination_limit_of_its_own_spares_the_receiver_every_421(
    tmp_path: Path, run_cli: RunCli
) -> None:
    """The operator's fix for a receiver known to take 2 connections:
    `destination_concurrency_limits = ["narrow.test=2"]`. No session meets a 421."""
    run = run_narrow_receiver(
        tmp_path, run_cli, "--destination-concurrency-limits", "narrow.test=2"
    )
    assert run.sink.busy_refusals == 0
    assert "of 2 allowed" in run.table or "narrow.test" not in run.table, run.table
