"""DeliveryAgent's reused sessions against a real sink on 127.0.0.1: RSET only when needed.

A transaction that ended with the reply to the final "." leaves the session
ready for the next MAIL; one that stopped earlier (every RCPT or DATA refused)
must be reset, or the next MAIL on that session gets "503 nested MAIL".
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from mqnode.delivery.client import Attempt, DeliveryAgent, Target, Transaction
from mqnode.delivery.feedback import Contact
from mqnode.spool.model import Outcome
from tests.support import minismtp
from tests.support.smtpsink import Sink, SinkHost, bind_common_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BODY = b"Subject: s\r\nMessage-ID: <m@test>\r\n\r\nhello\r\n"


@pytest.fixture
def sink() -> Iterator[Sink]:
    _port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        s = host.add("sink", socks["127.0.0.1"])
        yield s


def test_session_is_reset_only_after_an_unfinished_transaction(sink: Sink) -> None:
    sink.script_rcpt("gone@sink.test", "550 5.1.1 <gone@sink.test>: user unknown")
    sink.script_data("later@sink.test", "451 4.3.0 try again later")
    target = Target("sink.test", *sink.address)

    async def run() -> list[str]:
        agent = DeliveryAgent("client.test", timeout_s=10)
        outcomes = []
        try:
            for rcpt in (
                "gone@sink.test",  # every RCPT refused: unfinished, reset before reuse
                "a@sink.test",
                "later@sink.test",  # DATA answered 451 after the ".": finished
                "b@sink.test",
                "c@sink.test",
            ):
                tx = Transaction((target,), "from@client.test", ((0, rcpt),), BODY, lambda: True)
                outcomes.append((await agent.deliver(tx)).results[0][1])
        finally:
            await agent.close()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes == [
        Outcome.BOUNCED.value,
        Outcome.DELIVERED.value,
        Outcome.DEFERRED.value,
        Outcome.DELIVERED.value,
        Outcome.DELIVERED.value,
    ]
    assert sink.connections == 1  # one session carried all five
    assert [d.rcpts for d in sink.delivered()] == [
        ("a@sink.test",),
        ("b@sink.test",),
        ("c@sink.test",),
    ]


def test_size_is_declared_and_a_message_over_the_hosts_limit_is_not_sent() -> None:
    """RFC 1870: MAIL says SIZE=n; past the SIZE the host announced, a 5.3.4 bounce at once."""
    _port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        small = host.add("small", socks["127.0.0.1"], data_size_limit=4096)
        target = Target("small.test", *small.address)
        big = BODY + b"x" * 5000 + b"\r\n"

        async def run() -> list[tuple[int, str, str]]:
            agent = DeliveryAgent("client.test", timeout_s=10)
            try:
                out = []
                for body in (BODY, big):
                    tx = Transaction(
                        (target,), "from@client.test", ((0, "to@small.test"),), body, lambda: True
                    )
                    out += (await agent.deliver(tx)).results
                return out
            finally:
                await agent.close()

        fits, too_big = asyncio.run(run())
    assert fits[1] == Outcome.DELIVERED.value
    assert [d.mail_options for d in small.delivered()] == [(f"SIZE={len(BODY)}",)]
    assert too_big[1] == Outcome.BOUNCED.value
    assert too_big[2] == f"552 5.3.4 message size {len(big)} exceeds the server's size limit 4096"
    assert len(small.rcpts) == 1  # the big one never got as far as RCPT


def _deliver_all(sink: Sink, rcpts: list[str], max_rcpts: int) -> list[tuple[int, str, str]]:
    target = Target("sink.test", *sink.address)

    async def run() -> list[tuple[int, str, str]]:
        agent = DeliveryAgent("client.test", timeout_s=10, max_rcpts_per_transaction=max_rcpts)
        try:
            tx = Transaction(
                (target,), "from@client.test", tuple(enumerate(rcpts)), BODY, lambda: True
            )
            return (await agent.deliver(tx)).results
        finally:
            await agent.close()

    return asyncio.run(run())


def test_at_most_the_recipient_limit_per_transaction_the_rest_in_more(sink: Sink) -> None:
    """Postfix's smtp_destination_recipient_limit: 7 recipients, 3 per transaction, one
    attempt and one session."""
    rcpts = [f"r{k}@sink.test" for k in range(7)]
    results = _deliver_all(sink, rcpts, 3)
    assert sorted(results) == [(k, Outcome.DELIVERED.value, results[0][2]) for k in range(7)]
    assert [d.rcpts for d in sink.delivered()] == [
        tuple(rcpts[0:3]),
        tuple(rcpts[3:6]),
        (rcpts[6],),
    ]
    assert sink.connections == 1


def test_recipients_over_the_hosts_limit_go_again_at_once() -> None:
    """A host that takes 2 recipients per transaction answers the third "452 4.5.3 Too many
    recipients": those go in the next transaction of the same attempt (they waited a
    retry backoff each), and a 452 with nothing accepted stays a deferral."""
    _port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        small = host.add("small", socks["127.0.0.1"], max_rcpts=2)
        small.script_rcpt("busy@sink.test", "452 4.2.2 mailbox full")
        rcpts = [f"r{k}@sink.test" for k in range(5)] + ["busy@sink.test"]
        results = _deliver_all(small, rcpts, 50)
        outcomes = {k: out for k, out, _ in results}
        assert sorted(outcomes) == list(range(6)), results
        assert all(outcomes[k] == Outcome.DELIVERED.value for k in range(5)), results
        assert outcomes[5] == Outcome.DEFERRED.value, results
        assert [len(d.rcpts) for d in small.delivered()] == [2, 2, 1]
        assert small.connections == 1


def test_a_host_that_greets_with_421_is_busy_not_unreachable() -> None:
    """A receiver limiting connections greets the surplus with 421: the host is alive, so
    `deliver` names it and reports the session as busy (the dispatcher lowers the
    destination's concurrency for it; one 421 had suspended a busy destination for
    retry_base_s while its other sessions delivered). The recipients are deferred with the
    host's reply."""

    async def run() -> tuple[Attempt, int]:
        greeted = 0

        async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal greeted
            greeted += 1
            writer.write(b"421 4.7.0 mx.busy.test Error: too many connections from you\r\n")
            await writer.drain()
            writer.close()

        async with minismtp.serving(busy) as port:
            agent = DeliveryAgent("client.test", timeout_s=5)
            try:
                attempt = await agent.deliver(
                    Transaction(
                        (Target("mx.busy.test", "127.0.0.1", port),),
                        "from@client.test",
                        ((0, "a@busy.test"), (1, "b@busy.test")),
                        BODY,
                        lambda: True,
                    )
                )
            finally:
                await agent.close()
        return attempt, greeted

    attempt, greeted = asyncio.run(run())
    assert attempt.host == "mx.busy.test", "a host that answered 421 is not unreachable"
    assert attempt.contact is Contact.BUSY
    assert greeted == 1
    results = attempt.results
    assert [(i, out) for i, out, _ in results] == [(0, "deferred"), (1, "deferred")]
    assert all("421 4.7.0" in reply for _, _, reply in results), results


def test_a_refused_connection_is_unreachable_and_an_answered_one_is_not(sink: Sink) -> None:
    """How a session ended, for the dispatcher's feedback: no listener at all is
    unreachable; a host that answers the transaction, whatever it replies, answered."""
    sink.script_rcpt("gone@sink.test", "550 5.1.1 <gone@sink.test>: user unknown")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused

    async def run() -> tuple[Attempt, Attempt]:
        agent = DeliveryAgent("client.test", timeout_s=5)
        try:
            attempts = []
            for target, rcpt in (
                (Target("mx.dead.test", "127.0.0.1", port), "a@dead.test"),
                (Target("sink.test", *sink.address), "gone@sink.test"),
            ):
                tx = Transaction((target,), "from@client.test", ((0, rcpt),), BODY, lambda: True)
                attempts.append(await agent.deliver(tx))
        finally:
            await agent.close()
        return attempts[0], attempts[1]

    dead, live = asyncio.run(run())
    assert (dead.host, dead.contact) == ("", Contact.UNREACHABLE), dead
    assert (live.host, live.contact) == ("sink.test", Contact.ANSWERED), live
    assert live.results[0][1] == Outcome.BOUNCED.value, live


def test_a_parked_session_closed_at_mail_is_replaced_not_counted_lost() -> None:
    """A host that drops a connection when its second MAIL arrives (as one that closed
    an idle session just after our liveness check): the message goes over a new
    connection at once and the session counts as answered. Before, it was deferred with
    "lost connection" and, now that a lost session counts towards suspension, it could
    have suspended a destination narrowed to one session."""

    async def run() -> tuple[list[Attempt], int]:
        mails: list[bytes] = []  # MAIL commands on the current connection
        connections = 0

        def second_mail(line: bytes) -> bool:
            if line[:4].upper() == b"MAIL":
                mails.append(line)
            return len(mails) == 2  # drop the connection without a reply

        answer = minismtp.answer(b"mx.drop.test", drop=second_mail)

        async def counted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            mails.clear()
            await answer(r, w)

        async with minismtp.serving(counted) as port:
            agent = DeliveryAgent("client.test", timeout_s=5)
            target = Target("mx.drop.test", "127.0.0.1", port)
            try:
                attempts = []
                for k in range(2):
                    rcpts = ((0, f"r{k}@drop.test"),)
                    tx = Transaction((target,), "from@client.test", rcpts, BODY, lambda: True)
                    attempts.append(await agent.deliver(tx))
            finally:
                await agent.close()
        return attempts, connections

    attempts, connections = asyncio.run(run())
    assert [a.results[0][1] for a in attempts] == [Outcome.DELIVERED.value] * 2, attempts
    assert [a.contact for a in attempts] == [Contact.ANSWERED] * 2
    assert connections == 2
