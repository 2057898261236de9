"""Fuzz the SMTP ingress of a real 3-node cluster with Hypothesis.

Each example is one raw SMTP session against a random node: a mix of
malformed and out-of-order commands, bad and 8-bit addresses, ESMTP
parameters, SMTPUTF8 and binary message data, over-long lines, too many
header fields, whole transactions, and pipelining abuse (everything in one
write, bursts of hundreds of commands). A session ends either politely
(the data terminator, then QUIT) or truncated: cut at a random byte and
half-closed, so the node sees EOF mid-command or mid-DATA. Some sessions
come from 127.0.0.2, outside `allowed_networks`.

Every `250 ... queued as ID` the fuzz receives is recorded. Afterwards:
* every node is still up (`/healthz`) and logged no traceback;
* a normal submission still gets 250;
* every acknowledged message is queued exactly once on every node
  (`assert_acked_once`, by Message-ID).

Message-IDs in generated DATA are made fresh when the session runs, so a
replayed example is a new message, never a second copy of an old one.
No timing assertions: each session is read until the node closes it, within
a generous bound that fails the test with the session's transcript.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.checks import assert_acked_once
from tests.support.cluster import FAST_TUNING, Cluster, http_get
from tests.support.rawsmtp import RawSmtp
from tests.support.smtp import make_message, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MSGID = b"\0MSGID\0"  # replaced by a fresh Message-ID when the session runs
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")
SESSION_TIMEOUT_S = 20.0
FUZZ_ARGS = [
    *FAST_TUNING,
    "--max-message-bytes",
    "65536",
    "--max-recipients",
    "5",
    "--max-header-count",
    "40",
    "--max-commands-per-session",
    "300",
    "--client-connection-rate-per-min",
    "100000",
    "--client-message-rate-per-min",
    "100000",
]


@dataclass
class FuzzLog:
    acked: set[str] = field(default_factory=set)  # queue ids from 250 replies
    sessions: int = 0
    truncated: int = 0


@pytest.fixture
def fuzz_cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "fuzz", n=3, extra_args=FUZZ_ARGS) as c:
        yield c


# --- strategies -------------------------------------------------------------------


def utf8(text: str) -> bytes:
    return text.encode("utf-8")


no_crlf = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
words = st.text(max_size=30).map(utf8)
local_part = st.one_of(
    st.sampled_from([b"user", b"a.b+tag", b'"quoted local"', b"", b"..", b"\xc3\xa9l\xc3\xa8ve"]),
    st.text(min_size=1, max_size=20).map(utf8),
    no_crlf,
)
domain = st.one_of(
    st.sampled_from([b"example.test", b"[127.0.0.1]", b"-bad-.test", b"xn--bcher-kva.test", b""]),
    st.text(min_size=1, max_size=20).map(utf8),
)
address = st.one_of(
    st.just(b"<rcpt@example.test>"),
    st.builds(lambda lp, d: b"<" + lp + b"@" + d + b">", local_part, domain),
    st.sampled_from([b"<>", b"<@a.test,@b.test:c@d.test>", b"rcpt@example.test", b"<<x@y>>"]),
    no_crlf,
)
esmtp_params = st.lists(
    st.sampled_from(
        [
            b" SIZE=100",
            b" SIZE=abc",
            b" SIZE=99999999999999999999",
            b" BODY=8BITMIME",
            b" BODY=BINARYMIME",
            b" SMTPUTF8",
            b" RET=FULL",
            b" NOTIFY=NEVER",
            b" ENVID=x",
            b" FOO=bar",
            b" =",
        ]
    ),
    max_size=3,
).map(b"".join)
verb = st.sampled_from(
    [
        b"HELO",
        b"EHLO",
        b"MAIL FROM:",
        b"RCPT TO:",
        b"mail from:",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"STARTTLS",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"BDAT",
        b"QUIT",
        b"XCLIENT",
        b"",
    ]
)
command = st.one_of(
    st.builds(lambda v, a: v + b" " + a, verb, st.one_of(no_crlf, words, address)),
    st.builds(
        lambda v, a, p: v + a + p,
        st.sampled_from([b"MAIL FROM:", b"RCPT TO:"]),
        address,
        esmtp_params,
    ),
    verb,
    no_crlf,
    st.integers(500, 3000).map(lambda n: b"NOOP " + b"A" * n),  # over the command line limit
)
body_line = st.one_of(
    words,
    words,
    no_crlf,
    no_crlf,
    st.sampled_from(
        [b".", b"..", b". ", b"X-H: v", b" folded", b"\r", b"\x00\xff", b"Subject: \xe2\x98\x83"]
    ),
    st.integers(990, 1500).map(lambda n: b"B" * n),  # around the 1000-byte line limit
)
headers = st.integers(0, 50).map(lambda n: b"".join(b"X-Fuzz-%d: v\r\n" % i for i in range(n)))
message_data = st.builds(
    lambda h, lines: b"Message-ID: " + MSGID + b"\r\n" + h + b"\r\n" + b"\r\n".join(lines),
    headers,
    st.lists(body_line, max_size=12),
)


def _transaction(sender: bytes, params: bytes, rcpts: list[bytes], data: bytes) -> bytes:
    out = b"MAIL FROM:" + sender + params + b"\r\n"
    out += b"".join(b"RCPT TO:" + r + b"\r\n" for r in rcpts)
    return out + b"DATA\r\n" + data + b"\r\n.\r\n"


good_sender = st.sampled_from([b"<sender@client.test>", b"<>", b"<s\xc3\xa9nder@client.test>"])
good_rcpt = st.sampled_from([b"<rcpt@example.test>", b"<r\xc3\xa9ceiver@example.test>"])
good_params = st.sampled_from([b"", b" SMTPUTF8", b" BODY=8BITMIME", b" SMTPUTF8 BODY=8BITMIME"])
transaction = st.builds(
    _transaction,
    st.one_of(address, good_sender),
    esmtp_params,
    st.lists(st.one_of(good_rcpt, address), min_size=1, max_size=7),
    message_data,
)
# A well-formed envelope after RSET, so the 8-bit / SMTPUTF8 data itself gets to the handler.
clean_transaction = st.builds(
    lambda *a: b"RSET\r\n" + _transaction(*a),
    good_sender,
    good_params,
    st.lists(good_rcpt, min_size=1, max_size=3),
    message_data,
)
burst = st.builds(lambda c, n: (c + b"\r\n") * n, command, st.integers(10, 400))
# 8-bit and UTF-8 text within every limit: the lead of most sessions.
plain_data = st.builds(
    lambda lines: b"Message-ID: " + MSGID + b"\r\nSubject: fuzz\r\n\r\n" + b"\r\n".join(lines),
    st.lists(
        st.one_of(words, no_crlf).map(lambda b: b"." + b if b.startswith(b".") else b), max_size=8
    ),
)
lead_transaction = st.builds(
    _transaction, good_sender, good_params, st.lists(good_rcpt, min_size=1, max_size=3), plain_data
)
item = st.one_of(
    command.map(lambda c: c + b"\r\n"),
    transaction,
    clean_transaction,
    clean_transaction,
    burst,
)


@dataclass(frozen=True)
class Session:
    node: int
    source: str
    greeting: bytes
    lead: bytes  # often a clean transaction, so that some mail is acknowledged to check
    items: list[bytes]
    one_write: bool
    cut_at: float | None  # truncate at this fraction of the bytes, then half-close


sessions = st.builds(
    Session,
    node=st.integers(0, 2),
    source=st.sampled_from(["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"]),
    greeting=st.sampled_from(
        [b"EHLO fuzz.test\r\n", b"EHLO fuzz.test\r\n", b"HELO fuzz.test\r\n", b"EHLO \xff\r\n", b""]
    ),
    lead=st.one_of(st.just(b""), lead_transaction, lead_transaction),
    items=st.lists(item, min_size=1, max_size=8),
    one_write=st.booleans(),
    cut_at=st.one_of(st.none(), st.none(), st.floats(0.0, 1.0)),
)


# --- running a session --------------------------------------------------------------


def run_session(c: Cluster, s: Session, log: FuzzLog) -> None:
    fresh = [p.replace(MSGID, f"<{uuid.uuid4().hex}@fuzz.mqnode.test>".encode()) for p in s.items]
    parts = [s.greeting, s.lead.replace(MSGID, f"<{uuid.uuid4().hex}@fuzz.mqnode.test>".encode())]
    parts += fresh
    if s.cut_at is None:
        parts.append(b"\r\n.\r\nQUIT\r\n")  # ends DATA, a half-read line, an AUTH exchange
    else:
        data = b"".join(parts)
        parts = [data[: int(len(data) * s.cut_at)]]
        log.truncated += 1
    log.sessions += 1
    with RawSmtp.connect(c.nodes[s.node].smtp_port, s.source, timeout_s=SESSION_TIMEOUT_S) as conn:
        if s.one_write:
            conn.send(b"".join(parts))
        else:
            for p in parts:
                if not conn.send(p):
                    break
        if s.cut_at is not None:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        lines = conn.read_until_eof(SESSION_TIMEOUT_S)
    for line in lines:
        m = QUEUED.match(line)
        if m:
            log.acked.add(m.group(1))
    if not conn.eof:
        raise c.fail(
            f"node {s.node} did not finish a fuzz session within {SESSION_TIMEOUT_S:.0f}s; "
            f"last replies {conn.lines[-5:]}"
        )


def test_fuzz_smtp_ingress(fuzz_cluster: Cluster) -> None:
    c, log = fuzz_cluster, FuzzLog()

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(session=sessions)
    def fuzz(session: Session) -> None:
        run_session(c, session, log)

    fuzz()
    check_after_fuzz(c, log)


def check_after_fuzz(c: Cluster, log: FuzzLog) -> None:
    for node in c.nodes:
        if not node.running:
            raise c.fail(f"{node.node_id} died during the fuzz")
        http_get(node.admin_url + "/healthz")
    msg = make_message(1024)
    code, text, qid = submit(
        "127.0.0.1", c.nodes[0].smtp_port, "a@client.test", ["b@example.test"], msg.data
    )
    if code != 250 or not qid:
        raise c.fail(f"a normal submission after the fuzz got {code} {text!r}")
    c.wait_applied_equal(timeout_s=60)
    queued = {m["id"]: m for m in c.queue_messages(0)}
    missing = sorted(log.acked - queued.keys())
    assert not missing, f"acknowledged but not queued on n1: {missing[:20]}"
    acked = {str(queued[q]["message_id"]): q for q in log.acked}
    acked[msg.message_id] = qid
    assert len(acked) == len(log.acked) + 1, "two acknowledged messages share a Message-ID"
    assert_acked_once(c, acked)
    for node in c.nodes:
        if "Traceback" in node.log_path.read_text(encoding="utf-8", errors="replace"):
            raise c.fail(f"{node.node_id} logged a traceback during the fuzz")
    print(
        f"fuzz: {log.sessions} sessions ({log.truncated} truncated), "
        f"{len(log.acked)} messages acknowledged"
    )
