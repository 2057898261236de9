"""RFC 3461 DSN end to end: parameters in over SMTP, out to the next hop, reports back.

A 3-node cluster whose nodes take SMTP in a worker process (the Enqueue with
DSN fields crosses the worker link and the log), real DNS on loopback, and
recording sinks: `dsn.test` offers DSN (and records the parameters it is
given), `plain.test` does not, `refuse.test` refuses every recipient,
`senders.test` receives the reports. The nodes keep DSN fields only once every
member has announced that it reads them (raft/formats.py): the fixture waits for it.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage, Message

import pytest

from mqnode.raft.formats import DSN_LEVEL
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.dnsserver import DnsServer, mx_zones
from tests.support.smtpsink import DataEvent, Sink, SinkHost, bind_common_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SINKS = {"dsn": "127.0.0.2", "plain": "127.0.0.3", "refuse": "127.0.0.4", "senders": "127.0.0.5"}
WAIT_S = 45.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Sink]]]:
    port, socks = bind_common_port(list(SINKS.values()))
    base = tmp_path_factory.mktemp("dsn")
    with DnsServer(mx_zones(SINKS)) as dns, SinkHost() as host:
        sinks = {name: host.add(name, socks[ip], dsn=name == "dsn") for name, ip in SINKS.items()}
        sinks["refuse"].script_rcpt("*", "550 5.1.1 no such user here")
        args = (*FAST_TUNING, "--delivery-port", str(port), "--smtp-workers", "1")
        with Cluster(base, n=3, extra_args=args, dns_server=f"{dns.host}:{dns.port}") as c:
            c.wait_for_leader()

            def levels() -> tuple[bool | None, str]:
                seen = [c.status(i)["cluster_reads_level"] for i in range(3)]
                ready = all(level >= DSN_LEVEL for level in seen)
                return (True if ready else None), f"cluster reads levels {seen}"

            # Every member announced that it reads DSN fields (raft/formats.py); until then a
            # node would queue the mail without them.
            c.poll("every node to see the DSN reads level", levels, 30)
            yield c, sinks


def transaction(port: int, mail: list[str], rcpts: list[tuple[str, list[str]]]) -> list[int]:
    """EHLO, MAIL with `mail` parameters, each RCPT with its own, DATA: every reply code."""
    body = b"From: a@senders.test\r\nSubject: dsn\r\nMessage-ID: <dsn1@senders.test>\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30, local_hostname="client.test") as client:
        client.ehlo()
        assert client.has_extn("dsn"), client.esmtp_features
        codes = [client.mail("a@senders.test", mail)[0]]
        codes += [client.rcpt(addr, options)[0] for addr, options in rcpts]
        if codes[0] == 250 and any(code == 250 for code in codes[1:]):
            codes.append(client.data(body)[0])
    return codes


def wait_for(c: Cluster, sink: Sink, rcpt: str) -> DataEvent:
    def probe() -> tuple[DataEvent | None, str]:
        got = [d for d in sink.delivered() if rcpt in d.rcpts]
        return (got[0] if got else None), f"{sink.name} has {[d.rcpts for d in sink.datas]}"

    return c.poll(f"mail for {rcpt} at {sink.name}", probe, WAIT_S)


def status_blocks(content: bytes) -> tuple[EmailMessage, list[Message]]:
    report = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return report, blocks


def test_the_request_goes_to_a_dsn_host_and_the_rest_comes_back_in_one_report(
    setup: tuple[Cluster, dict[str, Sink]],
) -> None:
    c, sinks = setup
    codes = transaction(
        c.nodes[0].smtp_port,
        ["RET=HDRS", "ENVID=Ticket+2B42"],
        [
            ("ok@dsn.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Old+2Bbox@dsn.test"]),
            ("ok@plain.test", ["NOTIFY=SUCCESS,FAILURE"]),
            ("quiet@refuse.test", ["NOTIFY=NEVER"]),
            ("loud@refuse.test", []),
        ],
    )
    assert codes == [250, 250, 250, 250, 250, 250], codes
    wait_for(c, sinks["dsn"], "ok@dsn.test")
    wait_for(c, sinks["plain"], "ok@plain.test")
    params = dict(sinks["dsn"].params)
    assert params["a@senders.test"].split()[1:] == ["RET=HDRS", "ENVID=Ticket+2B42"]  # SIZE first
    assert params["ok@dsn.test"].split() == ["NOTIFY=SUCCESS", "ORCPT=rfc822;Old+2Bbox@dsn.test"]
    report_event = wait_for(c, sinks["senders"], "a@senders.test")
    assert report_event.mail_from == ""
    report, (per_message, *per_rcpt) = status_blocks(report_event.content)
    assert per_message["Original-Envelope-Id"] == "Ticket+2B42"
    actions = {str(b["Final-Recipient"]).split(";")[1].strip(): b["Action"] for b in per_rcpt}
    # ok@dsn.test: the DSN host answers for it; quiet@refuse.test asked for nothing.
    assert actions == {"ok@plain.test": "relayed", "loud@refuse.test": "failed"}, actions
    types = [p.get_content_type() for p in report.walk()]
    assert "text/rfc822-headers" in types and "message/rfc822" not in types, types
    c.wait_applied_equal(30)
    assert len([d for d in sinks["senders"].delivered() if d.mail_from == ""]) == 1


@pytest.mark.parametrize(
    ("mail", "rcpt", "expected"),
    [
        (["RET=ALL"], [], 501),
        (["ENVID=bad=xtext"], [], 501),
        (["RET=FULL", "RET=HDRS"], [], 501),
        ([], ["NOTIFY=NEVER,SUCCESS"], 501),
        ([], ["ORCPT=no-type"], 501),
        ([], ["RET=FULL"], 555),
    ],
)
def test_malformed_parameters_are_refused_with_the_command(
    setup: tuple[Cluster, dict[str, Sink]], mail: list[str], rcpt: list[str], expected: int
) -> None:
    c, _ = setup
    codes = transaction(c.nodes[1].smtp_port, mail, [("x@plain.test", rcpt)])
    assert expected in codes[:2], codes
