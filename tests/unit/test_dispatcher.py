"""Dispatcher logic against the real state machine and LMDB store, without Raft or sockets.

`LocalLog` stands in for the commit pipeline: each submit is applied at the
next index and committed at once (what a commit does, minus replication).
`ScriptedAgent` stands in for SMTP: it records what it was asked to send and
can hold a delivery open or raise. Clocks are manual; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import mqnode.delivery.dispatcher as dispatcher_module
from mqnode.clock import ManualClock
from mqnode.delivery.client import Attempt, Transaction
from mqnode.delivery.dispatcher import (
    CLAIM_AHEAD,
    DEEP_SCAN_INTERVAL_S,
    Dispatcher,
    DispatchSettings,
    _Destination,
)
from mqnode.delivery.feedback import ConcurrencyWindow, Contact
from mqnode.delivery.lease import LeaderLease
from mqnode.delivery.mx import MxAnswer, MxHost
from mqnode.delivery.retry import RetryPolicy
from mqnode.delivery.routing import Router
from mqnode.events import EventLog
from mqnode.spool.commands import Claim, Command, LeaseRenew, QueueOp
from mqnode.spool.dsnparams import DsnRequest
from mqnode.spool.model import Outcome, QueuedMessage
from mqnode.spool.statemachine import Result
from mqnode.spool.store import QueueStore

from .kit import T0, Transcript, enqueue

EPOCH = 5
RELAY = ("127.0.0.1", 2525)


class AnyDomainMx:
    """MxResolver's interface: every domain has one MX host (the agent never connects)."""

    async def resolve(self, domain: str) -> MxAnswer:
        return MxAnswer("hosts", (MxHost(10, f"mx.{domain}", ("127.0.0.1",)),), "")


class LocalLog:
    """The Replicator protocol over a Transcript: applied and committed on submit."""

    def __init__(self, tx: Transcript) -> None:
        self.tx = tx
        self.submitted: list[Command] = []

    async def submit(self, cmd: Command) -> Result:
        self.submitted.append(cmd)
        return self.tx.one(cmd)

    def is_leader(self) -> bool:
        return True


class ScriptedAgent:
    """DeliveryAgent's interface: 250 for everyone unless `behave` says otherwise."""

    def __init__(self) -> None:
        self.sent: list[str] = []  # Message bodies' first line per attempt, in order
        self.rcpts: list[tuple[str, ...]] = []  # the recipients of each transaction sent
        self.open = 0
        self.most_open = 0
        self.release = asyncio.Event()
        self.release.set()
        self.behave: Callable[[bytes], None] = lambda body: None
        self.unreachable: set[str] = set()  # domains no host of which takes a connection
        self.busy: set[str] = set()  # domains whose hosts greet with 421
        self.open_for: dict[str, int] = {}  # transactions open per domain
        self.most_open_for: dict[str, int] = {}
        self.tried: list[str] = []  # the domain of each transaction asked for
        self.offers_tls = False
        self.offers_dsn = False  # whether "the host" takes DSN parameters
        self.dsn_given: list[DsnRequest | None] = []  # each transaction's DSN request
        self.outcome: dict[str, tuple[str, str]] = {}  # recipient -> (outcome, reply)

    async def deliver(self, tx: Transaction) -> Attempt:
        rcpts = tx.rcpts
        domain = rcpts[0][1].rpartition("@")[2]
        self.tried.append(domain)
        self.dsn_given.append(tx.dsn)
        if tx.require_tls and not self.offers_tls:
            reply = "relay: TLS is required but not offered"
            results = [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts]
            return Attempt(results, "", Contact.NO_FEEDBACK)
        if domain in self.unreachable:
            reply = f"mx.{domain}[127.0.0.1]: Connection refused"
            results = [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts]
            return Attempt(results, "", Contact.UNREACHABLE)
        if domain in self.busy:
            reply = f"mx.{domain}[127.0.0.1]: 421 4.7.0 too many connections"
            results = [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts]
            return Attempt(results, f"mx.{domain}", Contact.BUSY)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.open_for[domain] = self.open_for.get(domain, 0) + 1
        self.most_open_for[domain] = max(self.most_open_for.get(domain, 0), self.open_for[domain])
        try:
            await self.release.wait()
            self.behave(tx.body)
            assert tx.gate(), "sent without a valid lease"
            self.sent.append(tx.body.split(b"\r\n", 1)[0].decode())
            self.rcpts.append(tuple(a for _, a in rcpts))
            ok = (Outcome.DELIVERED.value, "250 2.0.0 Ok")
            results = [(i, *self.outcome.get(a, ok)) for i, a in rcpts]
            took = tx.dsn is not None and self.offers_dsn
            passed = frozenset(i for i, _ in rcpts) if took else frozenset()
            return Attempt(results, "sink", Contact.ANSWERED, passed)
        finally:
            self.open -= 1
            self.open_for[domain] -= 1

    async def reap(self, everything: bool = False) -> None:
        return None


class Harness:
    def __init__(
        self,
        store: QueueStore,
        concurrency: int = 2,
        per_destination: int = 0,
        relay: bool = False,
        tls_required: frozenset[str] = frozenset(),
        initial_per_destination: int = 5,
        destination_limits: dict[str, int] | None = None,
    ) -> None:
        self.clock = ManualClock(wall_ms=T0 + 60_000)
        self.tx = Transcript(store)
        self.log = LocalLog(self.tx)
        self.agent = ScriptedAgent()
        self.lease = LeaderLease(self.clock, 3000, 500)
        self.store = store
        settings = DispatchSettings(
            node_id="n1",
            raft_addr="127.0.0.1:1",
            hostname="n1.test",
            concurrency=concurrency,
            per_destination=per_destination or concurrency,
            max_queue_lifetime_s=5 * 86400,
            tls_required_domains=tls_required,
            initial_per_destination=initial_per_destination,
            destination_limits=destination_limits or {},
        )
        self.d = Dispatcher(
            settings,
            store,
            self.log,
            self.agent,  # type: ignore[arg-type]
            Router(RELAY, None, 25) if relay else Router(None, AnyDomainMx(), 25),  # type: ignore[arg-type]
            self.lease,
            self.clock,
            RetryPolicy(),
            lambda: 0.5,
            lambda n: b"\x01" * n,
        )
        self.lease.on_leadership(EPOCH)
        self.tx.one(LeaseRenew("n1", "127.0.0.1:1", EPOCH, 3000))
        self.lease.renew_committed(self.clock.monotonic_s(), EPOCH)

    def queue(self, n: int, domain: str = "example.com", first: int = 0) -> list[str]:
        ids = [f"Q{k:03d}" for k in range(first, first + n)]
        for qid in ids:
            body = f"Subject: {qid}\r\n\r\nbody\r\n".encode()
            cmd = enqueue(qid, T0 + int(qid[1:]), rcpts=(f"rcpt@{domain}",), body=body)
            assert self.tx.one(cmd)[0] == "queued"
        return ids

    def message(self, qid: str) -> QueuedMessage | None:
        return self.store.get_message(qid)

    async def settle(self) -> None:
        """Let every started attempt run until it finishes or blocks."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def finish(self) -> None:
        await asyncio.gather(*list(self.d._tasks))

    async def drain(self, rounds: int) -> None:
        """Finish the attempts and scan again until no message is active (at most `rounds`
        scans); a permit cycle would hang a finish, hence the bound."""
        for _ in range(rounds):
            await asyncio.wait_for(self.finish(), 5)
            if not self.store.counts()["active"]:
                return
            await self.d._scan()
        await asyncio.wait_for(self.finish(), 5)

    async def scan_rounds(self, rounds: int) -> None:
        """Scan and finish every attempt, `rounds` times (due deferred mail included)."""
        for _ in range(rounds):
            await self.d._scan()
            await self.finish()

    async def scan_logging_events(self, path: Path) -> list[str]:
        """One scan and its attempts with the event log on: the events' names in order."""
        self.d.events = EventLog(str(path), "n1", self.clock)
        await self.d._scan()
        await self.finish()
        self.d.events.close()
        return [json.loads(line)["event"] for line in path.read_text().splitlines()]

    def advance(self, seconds: float) -> None:
        """Move the clocks on, the lease renewed meanwhile."""
        self.clock.advance(seconds)
        self.lease.renew_committed(self.clock.monotonic_s(), EPOCH)


def test_claims_ahead_of_the_slots_but_sends_at_most_concurrency(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=2)
        ids = h.queue(6)
        h.agent.release.clear()  # every delivery stays open
        await h.d._scan()
        await h.settle()
        claimed = [q for q in ids if (m := h.message(q)) is not None and m.claim_epoch == EPOCH]
        assert len(claimed) == 2 * CLAIM_AHEAD, claimed
        assert h.agent.open == 2, "more deliveries open than delivery_concurrency"
        h.agent.release.set()
        await h.finish()
        assert h.agent.most_open == 2
        assert sorted(h.agent.sent) == [f"Subject: {q}" for q in claimed]
        assert all(h.message(q) is None for q in claimed), "delivered: gone from the queue"

    asyncio.run(run())


def test_a_claimed_message_held_before_its_slot_frees_is_left_alone(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=1)
        first, second = h.queue(2)
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open == 1
        assert h.tx.one(QueueOp("hold", (second,), T0)) == ("ok", second)
        h.agent.release.set()
        await h.finish()
        assert h.agent.sent == [f"Subject: {first}"], "the held message was sent"
        held = h.message(second)
        assert held is not None and held.hold

    asyncio.run(run())


def test_an_unexpected_error_is_recorded_as_a_deferral_with_backoff(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=1)
        (qid,) = h.queue(1)

        def crash(body: bytes) -> None:
            raise RuntimeError("a bug in the agent")

        h.agent.behave = crash
        await h.d._scan()
        await h.finish()
        msg = h.message(qid)
        assert msg is not None, "an attempt that crashed must not lose the message"
        assert msg.claim_epoch == 0, "the claim is released by the recorded outcome"
        assert msg.recipients[0].last_reply.startswith("4.3.0 internal error"), msg.recipients[0]
        assert msg.next_attempt_ms > h.clock.wall_ms(), "due again at once: a retry loop"
        await h.d._scan()  # not due: nothing is claimed or attempted again
        await h.finish()
        assert h.agent.open == 0 and h.agent.sent == []

    asyncio.run(run())


def test_a_damaged_body_is_deferred_not_retried_every_scan(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=1)
        (qid,) = h.queue(1)
        txn = store.apply_txn()
        msg = txn.get_message(qid)
        assert msg is not None
        txn.delete_body(msg.body_key, msg.body_chunks)
        store.commit_apply()
        await h.d._scan()
        await h.finish()
        after = h.message(qid)
        assert after is not None and after.claim_epoch == 0
        assert after.recipients[0].last_reply.startswith("4.3.0 queued message damaged"), after
        assert after.next_attempt_ms > h.clock.wall_ms()
        assert h.agent.sent == []

    asyncio.run(run())


def test_per_destination_limit_and_no_state_kept_for_idle_destinations(
    store: QueueStore,
) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1)
        h.queue(3, "one.test")
        h.queue(1, "two.test", first=3)
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open == 2, "one per destination, two destinations"
        h.agent.release.set()
        await h.drain(10)  # 4 messages: a few scans at most
        assert h.agent.most_open == 2 and len(h.agent.sent) == 4
        assert h.d._dests == {}, "permits kept for destinations nobody uses"

    asyncio.run(run())


def test_a_slow_destination_does_not_stall_mail_for_another(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=2, per_destination=1)
        slow = h.queue(2, "slow.test")
        fast = h.queue(1, "fast.test", first=2)
        slow_open = asyncio.Event()

        async def hold_slow(body: bytes) -> None:
            if any(q.encode() in body for q in slow):
                await slow_open.wait()

        deliver = h.agent.deliver

        async def gated(tx: Transaction) -> Attempt:
            await hold_slow(tx.body)
            return await deliver(tx)

        h.agent.deliver = gated  # type: ignore[method-assign]
        await h.d._scan()
        await h.settle()
        try:
            assert h.agent.sent == [f"Subject: {fast[0]}"], h.agent.sent
        finally:
            slow_open.set()
            await h.finish()

    asyncio.run(run())


def test_a_backlog_for_one_destination_leaves_room_in_the_claim_window(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=2, per_destination=1)
        h.queue(10, "slow.test")  # due first
        (fast,) = h.queue(1, "fast.test", first=10)
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        claimed = {q for q in h.d._in_flight}
        assert fast in claimed, "the claim window filled up with one destination's backlog"
        assert len(claimed) == 1 + 2 * CLAIM_AHEAD, claimed  # slow: CLAIM_AHEAD x concurrency
        assert h.agent.open == 2, "one slow, one fast: no slot waits for a permit"
        h.agent.release.set()
        await h.finish()

    asyncio.run(run())


def test_messages_to_several_destinations_never_wait_on_each_other(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store, concurrency=1, per_destination=1)
        layouts = [("a.test", "b.test"), ("b.test", "a.test"), ("a.test",), ("b.test",)]
        for k, domains in enumerate(layouts):
            qid = f"M{k:03d}"
            body = f"Subject: {qid}\r\n\r\nbody\r\n".encode()
            rcpts = tuple(f"rcpt@{d}" for d in domains)
            assert h.tx.one(enqueue(qid, T0 + k, rcpts=rcpts, body=body))[0] == "queued"
        await h.drain(10)  # a permit cycle would hang here
        # One SMTP transaction per destination of each message.
        assert sorted(h.agent.sent) == [f"Subject: M{k:03d}" for k in (0, 0, 1, 1, 2, 3)]
        assert h.agent.most_open == 1
        assert h.d._dests == {} and h.d._claimed_for == {}

    asyncio.run(run())


def test_with_a_relay_host_every_domain_shares_the_relays_permits(store: QueueStore) -> None:
    """Postfix counts its relayhost as one nexthop: per_destination bounds the connections
    to the relay, whatever the recipient domains (it bounded them per domain, so a relay
    saw per_destination x the number of domains at once)."""

    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1, relay=True)
        for k, domain in enumerate(("a.test", "b.test", "c.test")):
            h.queue(2, domain, first=2 * k)
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open == 1, "more transactions open to the relay than per_destination"
        assert set(h.d._claimed_for) == {"[127.0.0.1]:2525"}, h.d._claimed_for
        h.agent.release.set()
        await h.drain(20)
        assert h.agent.most_open == 1 and len(h.agent.sent) == 6
        assert h.d._dests == {} and h.d._claimed_for == {}

    asyncio.run(run())


@pytest.mark.parametrize(("relay", "transactions"), [(True, 1), (False, 2)])
def test_with_a_relay_host_a_message_goes_in_one_transaction(
    store: QueueStore, relay: bool, transactions: int
) -> None:
    """One copy to the relay for all of a message's recipients (one per domain by MX)."""

    async def run() -> None:
        h = Harness(store, concurrency=1, relay=relay)
        rcpts = ("x@a.test", "y@b.test", "z@a.test")
        body = b"Subject: R\r\n\r\nbody\r\n"
        assert h.tx.one(enqueue("R001", T0, rcpts=rcpts, body=body))[0] == "queued"
        await h.d._scan()
        await h.finish()
        assert len(h.agent.rcpts) == transactions, h.agent.rcpts
        assert sorted(a for t in h.agent.rcpts for a in t) == sorted(rcpts)
        assert h.message("R001") is None, "delivered to every recipient"

    asyncio.run(run())


def test_mail_behind_a_long_backlog_for_a_busy_destination_goes_within_a_deep_scan(
    store: QueueStore,
) -> None:
    """A backlog for one destination longer than a scan reads (2 x batch entries) hid the
    mail behind it until the backlog drained; a deep scan, at most once per
    DEEP_SCAN_INTERVAL_S, reads past it."""

    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1)  # a window of 10: room left
        backlog = 3 * h.d._s.batch  # past what a shallow scan reads
        h.queue(backlog, "slow.test")  # due first
        (first,) = h.queue(1, "fast.test", first=backlog)
        h.agent.release.clear()
        await h.d._scan()  # the first scan may run deep
        await h.settle()
        assert first in h.d._in_flight, "mail behind the backlog was not found"
        (second,) = h.queue(1, "other.test", first=backlog + 1)
        await h.d._scan()  # a shallow scan: passes over the cached backlog, stops short
        assert second not in h.d._in_flight
        h.advance(DEEP_SCAN_INTERVAL_S)
        await h.d._scan()
        assert second in h.d._in_flight, "the next deep scan did not find it"
        h.agent.release.set()
        await h.finish()

    asyncio.run(run())


def test_a_deep_scan_jumps_over_a_backlog_longer_than_it_may_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep scan reads at most DEEP_SCAN_ENTRIES entries; a full destination's backlog,
    however long, costs it one seek in the due index by domain, so the mail behind it is
    found (the global index would spend the whole budget on the backlog)."""
    monkeypatch.setattr(dispatcher_module, "DEEP_SCAN_ENTRIES", 50)

    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1)
        backlog = 6 * h.d._s.batch  # far past 50 entries
        h.queue(backlog, "slow.test")
        h.agent.release.clear()
        await h.d._scan()  # fills slow.test's claims
        await h.settle()
        (behind,) = h.queue(1, "zz-fast.test", first=backlog)
        h.advance(DEEP_SCAN_INTERVAL_S)
        await h.d._scan()
        assert behind in h.d._in_flight, "the deep scan did not get past the backlog"
        h.agent.release.set()
        await h.finish()

    asyncio.run(run())


def test_an_unreachable_destination_is_suspended_until_retry_base_or_an_operator_retry(
    store: QueueStore,
) -> None:
    """No host of dead.test takes a connection: after the first failure (a whole cohort
    here: one session per destination) its messages are deferred without trying ("4.4.1
    delivery temporarily suspended"), other destinations go on, and dead.test is tried
    again after retry_base_s or an operator's retry (postqueue -f lifts Postfix's
    dead-destination throttle the same way)."""

    async def run() -> None:
        h = Harness(store, concurrency=1)
        h.agent.unreachable.add("dead.test")
        dead = h.queue(3, "dead.test")
        (live,) = h.queue(1, "live.test", first=3)
        await h.scan_rounds(6)
        assert h.agent.tried.count("dead.test") == 1, h.agent.tried
        assert h.agent.sent == [f"Subject: {live}"]
        replies = [h.message(q).recipients[0].last_reply for q in dead]  # type: ignore[union-attr]
        assert replies[0] == "mx.dead.test[127.0.0.1]: Connection refused", replies
        assert all(
            r == "4.4.1 delivery temporarily suspended: mx.dead.test[127.0.0.1]: Connection refused"
            for r in replies[1:]
        ), replies
        view = h.d.describe_destinations()
        why = "mx.dead.test[127.0.0.1]: Connection refused"
        assert view["suspended"] == [{"destination": "dead.test", "for_s": 300, "why": why}]
        assert h.d.suspended_count() == view["suspended_count"] == 1

        # An operator's retry of all three: tried again at once, suspended again.
        assert h.tx.one(QueueOp("retry", tuple(dead), h.clock.wall_ms()))[0] == "ok"
        await h.scan_rounds(6)
        assert h.agent.tried.count("dead.test") == 2, h.agent.tried

        # After retry_base_s (the messages' backoff too), tried again.
        h.advance(RetryPolicy().retry_max_s)
        h.agent.unreachable.clear()
        await h.scan_rounds(6)
        assert sorted(h.agent.sent[1:]) == [f"Subject: {q}" for q in dead], h.agent.sent
        assert h.d._suspended == {}

    asyncio.run(run())


def test_mail_only_for_suspended_destinations_is_deferred_without_a_claim(
    store: QueueStore,
) -> None:
    """A dead destination's backlog coming due: each message is deferred from the scan
    (one attempt counted, the suspension's reply, a new due time), never claimed nor
    read, while fresh mail to a live destination is delivered. A message that also has
    a live recipient, one that expires now, and one with a suppressed recipient take
    the attempt's path."""

    async def run() -> None:
        h = Harness(store, concurrency=2, initial_per_destination=1)
        h.agent.unreachable.add("dead.test")
        (first,) = h.queue(1, "dead.test")
        await h.scan_rounds(3)  # the first cohort fails: dead.test is suspended
        assert h.d.suspended_count() == 1
        backlog = h.queue(30, "dead.test", first=1)
        fresh = h.queue(3, "live.test", first=40)
        mixed = "MIXED"
        cmd = enqueue(mixed, T0, rcpts=("a@dead.test", "b@live.test"))
        assert h.tx.one(cmd)[0] == "queued"
        old = "OLD"  # received beyond the queue lifetime: expires at this attempt
        assert h.tx.one(enqueue(old, T0 - 6 * 86400_000, rcpts=("c@dead.test",)))[0] == "queued"
        h.log.submitted.clear()
        await h.scan_rounds(6)
        claimed = {q for c in h.log.submitted if isinstance(c, Claim) for q in c.queue_ids}
        assert claimed.isdisjoint(backlog), claimed
        assert {*fresh, mixed, old} <= claimed
        dsn = "From: Mail Delivery System <MAILER-DAEMON@n1.test>"  # the expired one's
        assert sorted(h.agent.sent) == sorted(
            [f"Subject: {q}" for q in fresh] + ["Subject: hi", dsn]  # + the mixed one's
        ), h.agent.sent
        assert h.agent.tried.count("dead.test") == 1  # the first cohort only
        for qid in backlog:
            msg = h.message(qid)
            assert msg is not None and msg.attempts == 1 and msg.claim_epoch == 0
            assert msg.next_attempt_ms > h.clock.wall_ms()
            assert msg.recipients[0].last_reply.startswith("4.4.1 delivery temporarily suspended")
        assert h.message(old) is None  # bounced: expired
        assert h.message(first) is not None
        assert h.d._deferring == set()

    asyncio.run(run())


def test_a_suppressed_recipient_of_a_dead_destination_takes_the_attempts_path(
    store: QueueStore,
) -> None:
    """Suppressed since it was queued: bounced at the attempt ("5.7.1 recipient
    suppressed"), not deferred with the dead destination's other mail."""

    async def run() -> None:
        h = Harness(store, concurrency=2, initial_per_destination=1)
        h.agent.unreachable.add("dead.test")
        h.queue(1, "dead.test")
        await h.scan_rounds(3)
        (listed,) = h.queue(1, "dead.test", first=1)
        h.d.suppressed = lambda rcpt, sender: "bounced" if rcpt == "rcpt@dead.test" else None
        await h.scan_rounds(3)
        assert h.message(listed) is None  # bounced, not deferred
        assert h.d.counts[Outcome.BOUNCED.value] == 1

    asyncio.run(run())


def test_a_destination_that_greets_with_421_gets_one_session_and_no_suspension(
    store: QueueStore,
) -> None:
    """Every host of busy.test greets with 421. Each refusal drops its window to the
    sessions open beside it (none here: the scripted 421 comes back at once), so to 1
    session, but never suspends it: the host answers, and a refusal costs no wait. Each
    message is deferred with the host's reply; others go on. The unreachable case (a
    cohort of sessions no host took) suspends: the test above."""

    async def run() -> None:
        h = Harness(store, concurrency=8, per_destination=4)
        h.agent.busy.add("busy.test")
        busy = h.queue(12, "busy.test")
        (live,) = h.queue(1, "live.test", first=12)
        await h.scan_rounds(6)
        assert h.agent.tried.count("busy.test") == 12, h.agent.tried
        assert h.agent.sent == [f"Subject: {live}"]
        replies = [h.message(q).recipients[0].last_reply for q in busy]  # type: ignore[union-attr]
        assert set(replies) == {"mx.busy.test[127.0.0.1]: 421 4.7.0 too many connections"}
        assert h.d._suspended == {}
        assert h.d._dests["busy.test"].window.sessions == 1
        assert h.d.describe_destinations() == {
            "suspended_count": 0,
            "suspended": [],
            "sessions": [{"destination": "busy.test", "open": 0, "allowed": 1, "limit": 4}],
        }

    asyncio.run(run())


def test_a_destinations_window_opens_with_answered_sessions(store: QueueStore) -> None:
    """From `initial_per_destination` (1 here) the window grows by 1/window per session
    answered (1, 2, 2.5, 2.9, ...) up to `per_destination` (4), never past it, and is
    kept between bursts."""

    async def run() -> None:
        h = Harness(store, concurrency=10, per_destination=4, initial_per_destination=1)
        h.queue(30, "grow.test")
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open == 1, "more sessions than the initial window"
        h.agent.release.set()
        await h.finish()  # the 20 claimed (2 x concurrency) delivered
        assert len(h.agent.sent) == 20
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open == 4, "the window did not open up to per_destination"
        h.agent.release.set()
        await h.drain(10)
        assert len(h.agent.sent) == 30 and h.agent.most_open_for["grow.test"] == 4
        # Idle, it keeps what it learnt: the next burst starts at 4 sessions.
        assert h.d._dests["grow.test"].window.sessions == 4 and not h.d._dests["grow.test"].users

    asyncio.run(run())


def test_a_destination_with_a_limit_of_its_own_gets_no_more_sessions(
    store: QueueStore,
) -> None:
    """destination_concurrency_limits: narrow.test is limited to 2 sessions while other
    domains get per_destination (4), and its window starts within that limit."""

    async def run() -> None:
        h = Harness(store, concurrency=10, per_destination=4, destination_limits={"narrow.test": 2})
        h.queue(6, "narrow.test")
        h.queue(6, "wide.test", first=6)
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.agent.open_for == {"narrow.test": 2, "wide.test": 4}, h.agent.open_for
        sessions = {d["destination"]: d for d in h.d.describe_destinations()["sessions"]}
        assert (sessions["narrow.test"]["allowed"], sessions["narrow.test"]["limit"]) == (2, 2)
        h.agent.release.set()
        await h.drain(10)
        assert len(h.agent.sent) == 12 and h.agent.most_open_for["narrow.test"] == 2

    asyncio.run(run())


def test_a_waiter_cancelled_as_it_is_handed_a_permit_gives_it_back() -> None:
    """Dispatcher.stop cancels attempts that may be waiting for a permit: one cancelled
    after a release handed it the permit must not keep it."""

    async def run() -> None:
        dest = _Destination(ConcurrencyWindow(1, 1))
        await dest.acquire()
        waiter = asyncio.create_task(dest.acquire())
        await asyncio.sleep(0)
        dest.release()  # handed to the waiter, which has not run yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(dest.acquire(), 1)  # free again

    asyncio.run(run())


def test_with_a_relay_host_scans_never_run_deep(store: QueueStore) -> None:
    """One destination: a message past the shallow scan waits for the same permits as
    the backlog ahead of it, so reading past the backlog would only cost CPU."""

    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1, relay=True)
        backlog = 3 * h.d._s.batch
        h.queue(backlog + 1, "a.test")
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        assert h.d._next_deep_scan_s == 0.0, "a deep scan ran"
        assert len(h.d._dests_seen) <= len(h.d._in_flight) + 2 * h.d._s.batch
        h.agent.release.set()
        await h.finish()

    asyncio.run(run())


def test_with_a_relay_host_a_scan_stops_once_the_relay_is_full(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One destination: once its claim window is full nothing further in the index can be
    taken. The scan stops there, and while it stays full the next scan reads nothing
    (each read on over the claimed head and a batch more, every time a slot freed)."""

    async def run() -> None:
        h = Harness(store, concurrency=4, per_destination=1, relay=True)
        backlog = 3 * h.d._s.batch
        h.queue(backlog, "a.test")
        h.agent.release.clear()
        await h.d._scan()
        await h.settle()
        room = h.d._s.concurrency * CLAIM_AHEAD
        assert len(h.d._in_flight) == room
        assert len(h.d._dests_seen) == room, "read on past the full relay"
        reads: list[int] = []
        real = store.iter_due

        def counting(*args: Any, **kwargs: Any) -> Any:
            reads.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "iter_due", counting)
        await h.d._scan()
        assert reads == [], "scanned the index while the relay was full"
        h.agent.release.set()
        await h.drain(2 * backlog // room)
        assert len(h.agent.sent) == backlog
        assert reads, "no scan once the relay had room again"

    asyncio.run(run())


def test_with_a_relay_host_tls_required_recipients_go_apart_and_suspend_nothing(
    store: QueueStore,
) -> None:
    """A relay without STARTTLS: recipients in a TLS-required domain are deferred in a
    transaction of their own, the message's other recipients are delivered, and the relay
    is not suspended for the mail that needs no TLS."""

    async def run() -> None:
        h = Harness(store, concurrency=1, relay=True, tls_required=frozenset({"bank.test"}))
        rcpts = ("a@bank.test", "b@plain.test")
        body = b"Subject: T\r\n\r\nbody\r\n"
        assert h.tx.one(enqueue("T001", T0, rcpts=rcpts, body=body))[0] == "queued"
        await h.d._scan()
        await h.finish()
        assert h.agent.rcpts == [("b@plain.test",)], h.agent.rcpts
        msg = h.message("T001")
        assert msg is not None and msg.recipients[0].last_reply.startswith("relay: TLS"), msg
        assert h.d._suspended == {}
        (other,) = h.queue(1, "plain.test", first=2)
        await h.d._scan()
        await h.finish()
        assert h.agent.sent[-1] == f"Subject: {other}"

    asyncio.run(run())


def test_dsn_requests_go_to_the_agent_and_decide_the_reports(
    store: QueueStore, tmp_path: Path
) -> None:
    """NOTIFY=SUCCESS: a relayed report unless the host took the request; NEVER: no bounce."""

    async def run() -> None:
        h = Harness(store, concurrency=4)
        rcpts = ("ok@example.com", "never@example.com", "bad@example.com")
        cmd = replace(
            enqueue("Q1", T0, rcpts=rcpts),
            dsn_envid="E-1",
            dsn_notify=("SUCCESS", "NEVER", "FAILURE"),
        )
        assert h.tx.one(cmd)[0] == "queued"
        h.agent.outcome = {
            "never@example.com": (Outcome.BOUNCED.value, "550 5.1.1 no such user"),
            "bad@example.com": (Outcome.BOUNCED.value, "550 5.1.1 no such user"),
        }
        h.agent.offers_dsn = False
        kinds = await h.scan_logging_events(tmp_path / "events.jsonl")
        assert [d.envid if d else None for d in h.agent.dsn_given] == ["E-1"]
        assert "bounce-queued" in kinds, kinds
        (report,) = [m for m in store.list_messages(100) if m.mail_from == ""]
        status = store.read_body(report).split(b"message/delivery-status")[1]
        status = status.split(b"\r\n--")[0]
        assert b"Original-Envelope-Id: E-1" in status
        assert b"Action: relayed" in status and b"Action: failed" in status
        assert b"never@example.com" not in status, "NOTIFY=NEVER was reported"

    asyncio.run(run())


def test_a_success_only_report_is_no_bounce_in_the_event_log(
    store: QueueStore, tmp_path: Path
) -> None:
    async def run() -> None:
        h = Harness(store)
        cmd = replace(enqueue("Q1", T0), dsn_notify=("SUCCESS",))
        assert h.tx.one(cmd)[0] == "queued"
        kinds = await h.scan_logging_events(tmp_path / "events.jsonl")
        assert "success-report-queued" in kinds and "bounce-queued" not in kinds, kinds

    asyncio.run(run())


def test_no_success_report_when_the_host_took_the_dsn_request(store: QueueStore) -> None:
    async def run() -> None:
        h = Harness(store)
        cmd = replace(enqueue("Q1", T0), dsn_notify=("SUCCESS",), dsn_orcpt=("rfc822;o@x",))
        assert h.tx.one(cmd)[0] == "queued"
        h.agent.offers_dsn = True
        await h.d._scan()
        await h.finish()
        (given,) = h.agent.dsn_given
        assert given is not None and given.rcpt_options(0) == ["NOTIFY=SUCCESS", "ORCPT=rfc822;o@x"]
        assert store.counts()["active"] == 0 and not list(store.list_messages(100))

    asyncio.run(run())
