"""Dispatcher: the lease holder's claim -> deliver -> record loop.

Only the node holding a valid dispatch lease sends (see delivery/lease.py and
docs/design/dispatch.md). Each scan:
  1. takes due messages (oldest due first, at most `batch`, at most the room
     in the claim window), skipping those in flight here, those claimed by
     an earlier epoch until the old lease is waited out, and those for a
     destination with enough claimed here already;
  2. commits a Claim for them; apply grants only unclaimed / ended claims;
  3. delivers each granted message once its destinations' permits and a
     delivery slot are free (re-read then: one held, deleted or re-claimed
     meanwhile is left alone):
     recipients grouped by destination (the relay host, else the domain:
     delivery/routing.py), each group routed and sent with a lease gate before the
     final ".";
  4. commits RecordOutcome per message (split so entries stay small), with
     a bounce (DSN) for bounced recipients in the same command, and bounces
     recipients deferred past `max_queue_lifetime_s` (4.4.7).

Limits: `concurrency` (C) deliveries in flight, `per_destination` per destination,
`batch` per scan, a scan every `scan_interval_s` unless woken.
A failover can duplicate at most the C messages in flight at that moment.

Claim window: up to CLAIM_AHEAD x C messages are claimed, C of them
delivering (SMTP, then waiting for the outcome to commit), the rest claimed
and waiting for a slot. A slot that frees finds its next message claimed
already instead of waiting for a scan and a Claim commit (that wait held
every slot about twice as long as the SMTP transaction itself under load).
Waiting messages were never sent, so they cannot be duplicated; after a
failover the new leader sends them once the old lease is waited out, as any
claimed message.

Destinations (recipient domains, or the one relay host) never block the
others: an attempt takes the permits of all its message's destinations (in
name order, so two multi-domain messages cannot wait on each other) *before*
a delivery slot, so a slot is only ever held by a transaction in progress; the permits go
back when its SMTP transactions end, before the outcome's commit. A scan
claims for one destination at most CLAIM_AHEAD x C messages, and the window
holds C/2 more, which only other destinations can take: one slow
destination with a backlog fills neither the slots nor the claim window.
(A cap of CLAIM_AHEAD x `per_destination` cost a single destination a sixth
of its end-to-end rate: its waiting messages are what keeps it busy while
outcomes commit.)

Concurrency feedback (delivery/feedback.py, after Postfix's scheduler): a destination
starts at `initial_per_destination` sessions and moves towards
`per_destination` (or its own limit in `destination_limits`) as its sessions
get transactions answered, and back towards 1 as they reach no host or lose
their connection; a 421 greeting drops it to the destination's other permits
held at that moment. A permit frees only while fewer than its window's
sessions are open.

Dead destinations: once a whole cohort of a destination's sessions failed in
a row (as many as its window; a destination none of whose hosts answers
fails its first cohort together, on the same connect timeout), it is
suspended for `retry_base_s`: its messages are deferred at once ("4.4.1
delivery temporarily suspended: <why>") instead of each waiting out its own
connection timeouts, which held delivery slots and permits for
`delivery_timeout_s` apiece (Postfix marks such a destination dead the same
way). A message all of whose pending recipients go to suspended destinations
is deferred straight from the scan (`_defer_suspended`): no claim, slot,
permit or body read, so a dead destination's deep backlog coming due costs
fresh mail little (bench `deep`). A host without the TLS a domain requires
is no failure: it may take the destination's other mail. An operator's
retry (`mqnode queue retry` / `flush`) lifts every suspension, as
`postqueue -f` does. Windows and suspensions live in the lease holder's
memory: a new leader probes afresh.

Scan depth: a scan reads the due index oldest first, passing over messages
for destinations at their claim limit (known from an earlier scan: not
decoded again), and stops after `2 x batch` index entries past those in
flight. Once every DEEP_SCAN_INTERVAL_S a deep scan reads the state's due index
per recipient domain instead (spool/store.py `iter_due_by_domain`): domain by
domain in name order, round robin from where the last one stopped, a domain
whose destination is full costing one seek however long its backlog, up to
DEEP_SCAN_ENTRIES entries and seeks and DEEP_SCAN_DECODES decodes. So mail
behind a backlog for busy destinations (a newsletter to one domain) goes
within about a second instead of after the backlog, at any backlog size.
With a relay host (one destination) scans never run deep, and read nothing
while the relay has its claim window's worth claimed. With traffic
shaping rules every scan goes domain by domain: a paced or suspended site's
domains are jumped over, and its backlog, due ahead of other mail for as long
as it drains, never stands in front of other sites' mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from mqnode.clock import Clock
from mqnode.delivery.auto_suppress import AutoSuppress
from mqnode.delivery.bounce_classes import BounceClassifier, Category
from mqnode.delivery.client import DeliveryAgent, LeaseLost, Transaction
from mqnode.delivery.feedback import ConcurrencyWindow, Contact
from mqnode.delivery.lease import LeaderLease
from mqnode.delivery.retry import RetryPolicy
from mqnode.delivery.routing import Router
from mqnode.delivery.shaping import Shaper
from mqnode.dsn.notify import report_for
from mqnode.errors import CorruptDataError, MqnodeError
from mqnode.events import EventLog
from mqnode.raft.commit_pipeline import Replicator
from mqnode.spool.commands import Claim, LeaseRenew, RecordOutcome
from mqnode.spool.model import Outcome, QueuedMessage, RcptState, RecipientResult, make_queue_id
from mqnode.spool.shaping_rules import SiteConfig
from mqnode.spool.store import QueueStore

log = logging.getLogger(__name__)

MAX_REPLY_CHARS = 256
# A recipient bounced at dispatch because it was suppressed after the message was queued.
SUPPRESSED_REPLY = "5.7.1 recipient suppressed"
# An expired message's reply is the last one it got, behind this: its category is that one's.
_EXPIRED = re.compile(r"^4\.4\.7 message expired in queue: ")
RESULTS_PER_COMMAND = 100
CLAIM_AHEAD = 2  # claimed messages per delivery slot (see the module docstring)
DESTS_SEEN_MAX = 100_000
DEEP_SCAN_ENTRIES = 20_000  # index entries and domain seeks of a deep scan (module docstring)
DEEP_SCAN_DECODES = 2_000
DEEP_SCAN_INTERVAL_S = 1.0
SUSPENDED_MAX = 10_000  # destinations remembered as dead; all forgotten beyond
SUSPENDED_DEFERS_PER_SCAN = 500  # mail to dead destinations deferred by one scan, at most
DESCRIBED_MAX = 20  # destinations of each kind /status lists
IDLE_WINDOWS_MAX = 10_000  # idle destinations whose window feedback moved; idem


@dataclass(frozen=True)
class DispatchSettings:
    node_id: str
    raft_addr: str
    hostname: str
    concurrency: int
    per_destination: int
    max_queue_lifetime_s: int
    tls_required_domains: frozenset[str]
    batch: int = 100
    scan_interval_s: float = 0.5
    initial_per_destination: int = 5  # Postfix's initial_destination_concurrency
    # A destination's own limit instead of `per_destination` (destination_concurrency_limits)
    destination_limits: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    def __init__(
        self,
        settings: DispatchSettings,
        store: QueueStore,
        replicator: Replicator,
        agent: DeliveryAgent,
        router: Router,
        lease: LeaderLease,
        clock: Clock,
        policy: RetryPolicy,
        unit_random: Callable[[], float],
        random_bytes: Callable[[int], bytes],
        sign_report: Callable[[bytes, int], bytes] | None = None,
        classify: Callable[[str, str], Category] | None = None,
    ) -> None:
        self._s = settings
        self._sign_report = sign_report  # DKIM for the DSNs this node writes
        # The bounce category of a reply and the host that gave it (events, metrics).
        self._classify = classify or BounceClassifier.load().classify
        self._store = store
        self._rep = replicator
        self._agent = agent
        self._router = router
        self._lease = lease
        self._clock = clock
        self._policy = policy
        self._random = unit_random
        self._random_bytes = random_bytes
        self._slots = asyncio.Semaphore(settings.concurrency)
        # Per destination: its window and permits. Dropped once no attempt holds or waits
        # for a permit and its window is as a new one would be; at most IDLE_WINDOWS_MAX
        # idle ones beyond that, so a node that has sent to millions of domains keeps few.
        self._dests: dict[str, _Destination] = {}
        self._in_flight: set[str] = set()
        self._deferring: set[str] = set()  # suspended-only mail being deferred (no claim)
        self._claimed_for: dict[str, int] = {}  # destination -> messages claimed here for it
        # Destinations of due messages seen by scans, so a scan passes over those for a
        # destination at its claim limit without decoding them again (a backlog for one
        # destination is read on every scan). Bounded; forgotten once an attempt ends.
        self._dests_seen: dict[str, tuple[str, ...]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._next_deep_scan_s = 0.0  # monotonic; the first scan may run deep
        self._domain_cursor = ""  # where the next scan by domain starts (round robin)
        # Dead destination -> (monotonic time its suspension ends, why).
        self._suspended: dict[str, tuple[float, str]] = {}
        self._retries_seen = -1  # the store's operator retry count at the last scan
        self.counts = {o.value: 0 for o in Outcome}
        # (outcome, bounce category, shaping site) -> recipients
        self.categories: dict[tuple[str, str, str], int] = {}
        # The suppression list (spool/suppression.py): why mail from the sender's domain to
        # an address must not go, or None; checked again before each delivery, for mail
        # queued before the entry. And what a hard bounce adds to it (AutoSuppress).
        self.suppressed: Callable[[str, str], str | None] = lambda rcpt, sender: None
        self.auto_suppress: AutoSuppress | None = None
        # suppression_action "drop": SMTP accepts suppressed recipients, dispatch drops them
        # (event "suppressed", no DSN) instead of bouncing them.
        self.suppression_drops = False
        # Traffic shaping per site (delivery/shaping.py), with the rules the state holds.
        self.shaper = Shaper(clock, self._classify, settings.concurrency)
        self.events: EventLog | None = None
        self.on_attempt: Callable[[float], None] = lambda seconds: None  # metrics hook

    def wake(self) -> None:
        self._wake.set()

    def suspended_count(self) -> int:
        """Destinations suspended now (the metric; /status has the list)."""
        now = self._clock.monotonic_s()
        return sum(1 for until, _ in self._suspended.values() if until > now)

    def describe_destinations(self) -> dict[str, Any]:
        """For /status: suspended destinations (longest left first) and those below their
        limit of sessions or with sessions open (fewest allowed first), DESCRIBED_MAX each.
        Empty on a node that does not dispatch."""
        now = self._clock.monotonic_s()
        suspended = sorted(
            ((until - now, dest, why) for dest, (until, why) in self._suspended.items()),
            reverse=True,
        )
        suspended = [entry for entry in suspended if entry[0] > 0]  # as suspended_count
        windows = sorted(
            (r.window.sessions, -r.held, dest, r.window.limit)
            for dest, r in self._dests.items()
            if r.held or r.window.sessions < r.window.limit
        )
        return {
            "suspended_count": len(suspended),
            "suspended": [
                {"destination": dest, "for_s": round(left), "why": why}
                for left, dest, why in suspended[:DESCRIBED_MAX]
            ],
            "sessions": [
                {"destination": dest, "open": -neg_open, "allowed": allowed, "limit": limit}
                for allowed, neg_open, dest, limit in windows[:DESCRIBED_MAX]
            ],
            **({"sites": self.shaper.describe()} if self.shaper.active else {}),
        }

    async def run(self) -> None:
        renew = asyncio.create_task(self._renew_loop(), name="lease-renew")
        loop = asyncio.get_running_loop()
        try:
            while True:
                # A timer that wakes the loop, not asyncio.wait_for (a task per scan).
                timer = loop.call_later(self._s.scan_interval_s, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                self._wake.clear()
                try:
                    await self._scan()
                except MqnodeError as exc:
                    log.warning("dispatch scan failed: %s", exc)
                # Idle sessions are closed on time, and all of them once we stop dispatching.
                await self._agent.reap(everything=not self._lease.valid())
        finally:
            renew.cancel()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the lease -------------------------------------------------------------------
    async def _renew_loop(self) -> None:
        lease = self._lease
        while True:
            epoch = lease.epoch
            if epoch > 0:
                started = lease.renew_started()
                cmd = LeaseRenew(
                    self._s.node_id, self._s.raft_addr, epoch, int(lease.lease_s * 1000)
                )
                try:
                    status, _ = await self._rep.submit(cmd)
                    if status == "ok":
                        was_valid = lease.valid()
                        if not lease.renew_committed(started, epoch):
                            log.info(
                                "a lease renewal of epoch %d committed after this node left "
                                "that epoch (now %d): it extends nothing",
                                epoch,
                                lease.epoch,
                            )
                        elif not was_valid:
                            log.info("dispatch lease acquired (epoch %d)", epoch)
                            self.wake()
                except MqnodeError as exc:
                    log.info("lease renewal not committed: %s", exc)
            await asyncio.sleep(lease.renew_interval_s)

    # -- claim and dispatch ------------------------------------------------------------
    async def _scan(self) -> None:
        lease = self._lease
        epoch = lease.epoch
        if not lease.valid(epoch):
            return
        self.shaper.load(self._store.shaping())
        retries = self._store.operator_retries()
        if retries != self._retries_seen:  # an operator's retry lifts every suspension
            self._retries_seen = retries
            self._suspended.clear()
        # Up to CLAIM_AHEAD x C claimed for any one destination, and C/2 places more
        # that only other destinations can take (see the module docstring).
        room = self._s.concurrency * CLAIM_AHEAD
        free = room + max(1, self._s.concurrency // 2) - len(self._in_flight)
        if free <= 0:
            return
        waited_out = lease.waited_out()
        picked: dict[str, tuple[str, ...]] = {}  # queue id -> its destinations
        planned: dict[str, int] = {}
        known_full: set[tuple[str, ...]] = set()  # full stays full for the rest of the scan

        def full(dests: tuple[str, ...]) -> bool:
            if dests in known_full:
                return True
            if any(
                self._claimed_for.get(d, 0) + planned.get(d, 0) >= room or self.shaper.blocked(d)
                for d in dests
            ):
                known_full.add(dests)
                return True
            return False

        # With a relay host all mail has one destination: once it is full (and not
        # suspended, whose mail the scan defers) no message in the index can be taken, and
        # reading on (the claimed ones at its head, then `examined` more) is wasted.
        relay = (self._router.nexthop(""),) if self._router.one_destination else None
        if relay is not None and full(relay) and relay[0] not in self._suspended:
            return

        if len(self._dests_seen) > DESTS_SEEN_MAX:
            self._dests_seen.clear()
        skip = _Skip(self._in_flight | self._deferring, self._dests_seen, full)
        defer_now: list[QueuedMessage] = []  # every destination suspended: no attempt
        now_ms = self._clock.wall_ms()
        examined = len(self._in_flight) + len(self._deferring) + 2 * self._s.batch
        limit = self._s.batch
        now_s = self._clock.monotonic_s()
        # Past a backlog for busy destinations; pointless with one destination (a relay):
        # every message then waits for the same permits.
        deep = now_s >= self._next_deep_scan_s and not self._router.one_destination
        if deep:
            self._next_deep_scan_s = now_s + DEEP_SCAN_INTERVAL_S
            examined = max(examined, DEEP_SCAN_ENTRIES)
            limit = max(limit, DEEP_SCAN_DECODES)
        if deep or self.shaper.active:  # domain by domain, jumping over full ones
            nexthop = self._router.nexthop
            stopped: list[str] = []
            due = self._store.iter_due_by_domain(
                now_ms,
                limit,
                skip,
                examined,
                lambda domain: full((nexthop(domain),)),
                self._domain_cursor,
                stopped,
            )
        else:
            due = self._store.iter_due(now_ms, limit, skip, examined)
        # Closed before the first await: it holds the store's lock and a read transaction.
        with closing(due):
            for msg in due:
                if msg.claim_epoch not in (0, epoch) and not waited_out:
                    continue  # another leader's claim: wait out its lease first
                dests = self._dests_seen[msg.queue_id] = self._destinations(msg)
                if len(defer_now) < SUSPENDED_DEFERS_PER_SCAN and self._only_suspended(
                    msg, dests, now_ms
                ):
                    defer_now.append(msg)
                    continue
                if full(dests):
                    if relay is not None:
                        break  # the one destination: nothing further can be taken
                    continue  # that destination has enough waiting here: look further
                picked[msg.queue_id] = dests
                for d in dests:
                    planned[d] = planned.get(d, 0) + 1
                if len(picked) >= free or (relay is not None and full(relay)):
                    break
        if deep or self.shaper.active:
            self._domain_cursor = stopped[0] if stopped else ""
        if defer_now:
            self._deferring.update(m.queue_id for m in defer_now)
            task = asyncio.create_task(self._defer_suspended(defer_now, epoch), name="defer")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not picked:
            return
        status, granted = await self._rep.submit(Claim(tuple(picked), self._s.node_id, epoch))
        if status != "ok" or not granted:
            return
        for qid in granted.split(","):
            if self.events is not None:
                self.events.emit("claimed", qid, epoch=epoch)
            self._in_flight.add(qid)
            dests = picked.get(qid, ())
            self._count_claims(dests, +1)
            self.shaper.claim(qid, dests)
            task = asyncio.create_task(self._attempt(qid, epoch, dests), name=f"deliver-{qid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _destinations(self, msg: QueuedMessage) -> tuple[str, ...]:
        """A message's pending destinations, sorted (the order permits are taken in)."""
        return destinations(msg, self._router.nexthop)

    def _count_claims(self, dests: tuple[str, ...], delta: int) -> None:
        for d in dests:
            n = self._claimed_for.get(d, 0) + delta
            if n > 0:
                self._claimed_for[d] = n
            else:
                self._claimed_for.pop(d, None)

    async def _attempt(self, qid: str, epoch: int, dests: tuple[str, ...]) -> None:
        try:
            # Permits first, then a slot: a slot is never held waiting for a destination.
            # The permits go back once the SMTP transactions are done, before the outcome's
            # commit (held through it, one destination's end-to-end rate fell by a fifth).
            async with contextlib.AsyncExitStack() as permits:
                if self.shaper.active:  # the sites' pace and connection budgets first
                    sites = [await self._site(dest) for dest in dests]
                    for site in sites:
                        await self.shaper.pace(site)
                    await permits.enter_async_context(self.shaper.connections(sites))
                await self._take_permits(permits, dests)
                async with self._slots:
                    msg = self._store.get_message(qid)  # as it is now, not as claimed
                    if msg is None or msg.hold or msg.claim_epoch != epoch:
                        return  # deleted, held or claimed by a newer leader while it waited
                    if not self._lease.valid(epoch):
                        return  # still claimed: sent after a take-over waits out this lease
                    started = self._clock.monotonic_s()
                    await self._deliver(msg, epoch, permits.aclose)
                    self.on_attempt(self._clock.monotonic_s() - started)
            # A slot is free: scan now rather than at the next tick, or a backlog
            # drains at the claim window per `scan_interval_s`. Only after a recorded
            # attempt, so a failing commit never turns into a resend loop.
            self.wake()
        except LeaseLost:
            log.warning("%s: lease lost mid-delivery; not completed, not recorded", qid)
        except MqnodeError as exc:
            log.warning("%s: attempt not recorded: %s", qid, exc)
        except Exception:
            log.exception("%s: delivery attempt crashed", qid)
        finally:
            self._in_flight.discard(qid)
            self._dests_seen.pop(qid, None)  # its pending recipients may have changed
            self._count_claims(dests, -1)
            self.shaper.release(qid)

    async def _deliver(
        self, msg: QueuedMessage, epoch: int, sent: Callable[[], Awaitable[None]]
    ) -> None:
        """Send to every pending destination, call `sent()`, record the outcome."""
        # One transaction per destination, and apart for domains that require TLS: a relay
        # that does not offer it must not hold up the recipients that do not need it.
        tls_required = self._s.tls_required_domains
        by_dest: defaultdict[tuple[str, bool], list[tuple[int, str]]] = defaultdict(list)
        skipped: list[RecipientResult] = []  # suppressed since the message was queued
        sender_domain = domain_of(msg.mail_from) if "@" in msg.mail_from else ""
        for i, r in enumerate(msg.recipients):
            if r.state is RcptState.PENDING:
                why = self.suppressed(r.address, sender_domain)
                if why is not None:
                    skipped.append((i, Outcome.BOUNCED.value, f"{SUPPRESSED_REPLY} ({why})"))
                    continue
                domain = domain_of(r.address)
                key = (self._router.nexthop(domain), domain in tls_required)
                by_dest[key].append((i, r.address))
        if not by_dest and not skipped:
            return
        try:
            body = self._store.read_body(msg)
        except CorruptDataError as exc:
            # This node's copy is damaged; another leader's may not be. Defer with backoff
            # (raising left it claimed and due: the same error every scan).
            log.error("%s: cannot read the message body: %s", msg.queue_id, exc)
            reply = f"4.3.0 queued message damaged on {self._s.node_id}: {exc}"
            pending = [i for rcpts in by_dest.values() for i, _ in rcpts]
            deferred = [(i, Outcome.DEFERRED.value, reply) for i in pending]
            await self._record(msg, epoch, deferred + skipped, {}, b"")
            return
        results: list[RecipientResult] = list(skipped)
        remote: dict[int, str] = {}
        passed: frozenset[int] = frozenset()  # delivered to hosts that took the DSN request
        for (dest, require_tls), rcpts in by_dest.items():
            part, host, dsn_passed = await self._deliver_to(
                dest, require_tls, rcpts, msg, body, epoch
            )
            results += part
            passed |= dsn_passed
            remote.update((i, host) for i, _, _ in part)
        await sent()
        await self._record(msg, epoch, results, remote, body, passed)

    async def _deliver_to(
        self,
        dest: str,
        require_tls: bool,
        rcpts: list[tuple[int, str]],
        msg: QueuedMessage,
        body: bytes,
        epoch: int,
    ) -> tuple[list[RecipientResult], str, frozenset[int]]:
        """One transaction for `rcpts`, all bound for destination `dest` (DeliveryAgent.deliver)."""
        none: frozenset[int] = frozenset()
        suspended = self._suspended.get(dest)
        if suspended is not None:
            if suspended[0] > self._clock.monotonic_s():
                reply = f"4.4.1 delivery temporarily suspended: {suspended[1]}"
                return [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts], "", none
            del self._suspended[dest]
        route = await self._router.route(dest)
        if route.kind in ("bounce", "defer"):
            outcome = Outcome.BOUNCED if route.kind == "bounce" else Outcome.DEFERRED
            reply = f"{route.status} {route.reason}"
            return [(i, outcome.value, reply) for i, _ in rcpts], "", none
        site = self.shaper.rules.default  # no limits, without rules
        why = None
        if self.shaper.active:
            site = self.shaper.site_for_route(dest, tuple(t.name for t in route.targets))
            why = self.shaper.suspension(site)
        if why is not None:
            reply = f"4.4.1 delivery temporarily suspended: site {site.name}: {why}"
            return [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts], "", none
        tx = Transaction(
            route.targets,
            msg.mail_from,
            tuple(rcpts),
            body,
            gate=lambda: self._lease.valid(epoch),
            require_tls=require_tls or site.tls_required,
            dsn=msg.dsn or None,
            max_rcpts=site.recipients_per_transaction,
            max_uses=site.messages_per_connection,
            connect_gate=self.shaper.connect_gate(site) if self.shaper.active else None,
        )
        try:  # the destination's permit is held already (_attempt)
            attempt = await self._agent.deliver(tx)
        except LeaseLost:
            raise
        except Exception as exc:
            # A bug, not the remote host: defer with backoff (Postfix: "deferred:
            # internal error") instead of leaving it claimed and due, which re-ran
            # the same crash every scan (seen with a UTF-8 address).
            log.exception("%s: delivery to %s failed unexpectedly", msg.queue_id, dest)
            reply = f"4.3.0 internal error delivering to {dest}: {type(exc).__name__}"
            return [(i, Outcome.DEFERRED.value, reply) for i, _ in rcpts], "", none
        results = attempt.results
        if self._feedback(dest, attempt.contact) and results:
            self._suspend(dest, results[0][2])
        if self.shaper.active:
            suspend_s = float(site.retry_base_s or self._policy.retry_base_s)
            why = self.shaper.after(site, results, attempt.host, suspend_s)
            if why is not None and self.events is not None:
                self.events.emit("site-suspended", msg.queue_id, site=site.name, why=why)
        return results, attempt.host, attempt.dsn_passed

    def _dropped(self, reply: str) -> bool:
        return self.suppression_drops and reply.startswith(SUPPRESSED_REPLY)

    def _retry_policy(self, msg: QueuedMessage) -> RetryPolicy:
        """The node's, or the retry overrides of the site of the message's first destination."""
        dests = self._destinations(msg) if self.shaper.active else ()
        if not dests:
            return self._policy
        site = self.shaper.site_of(dests[0])
        if not (site.retry_base_s or site.retry_max_s):
            return self._policy
        return RetryPolicy(
            float(site.retry_base_s or self._policy.retry_base_s),
            float(site.retry_max_s or self._policy.retry_max_s),
            self._policy.jitter_ratio,
        )

    async def _site(self, dest: str) -> SiteConfig:
        """The destination's shaping site, from its MX hosts (the router's lookup)."""
        route = await self._router.route(dest)
        return self.shaper.site_for_route(dest, tuple(t.name for t in route.targets))

    def _feedback(self, dest: str, contact: Contact) -> bool:
        """A session's end into the destination's window; True if it is now dead."""
        record = self._dests.get(dest)  # held: the attempt has its permit
        if record is None:
            return False
        # The other permits held: sessions open, or attempts about to open one (one
        # waiting for another destination's permit or a slot counts too: a 421 then
        # narrows the window less than the receiver's limit, never more).
        dead = record.window.feedback(contact, record.held - 1)
        if dead:  # after the suspension it starts afresh, as in Postfix
            record.window = self._new_window(dest)
        record.wake()  # the window may have grown
        return dead

    def _new_window(self, dest: str) -> ConcurrencyWindow:
        limit = self._s.destination_limits.get(dest, self._s.per_destination)
        return ConcurrencyWindow(self._s.initial_per_destination, limit)

    def _only_suspended(self, msg: QueuedMessage, dests: tuple[str, ...], now_ms: int) -> bool:
        """Whether every pending recipient goes to a suspended destination, so that the
        attempt would only defer it: then it is deferred without a claim, a delivery slot,
        permits or its body (`_defer_suspended`). Not mail that expires now (it bounces,
        with a DSN) nor a suppressed recipient (bounced or dropped): those take the
        attempt's path."""
        now_s = self._clock.monotonic_s()
        if not dests or any(self._suspended.get(d, (0.0, ""))[0] <= now_s for d in dests):
            return False
        if now_ms - msg.received_ms > self._s.max_queue_lifetime_s * 1000:
            return False
        sender_domain = domain_of(msg.mail_from) if "@" in msg.mail_from else ""
        return not any(
            self.suppressed(r.address, sender_domain) is not None
            for r in msg.recipients
            if r.state is RcptState.PENDING
        )

    async def _defer_suspended(self, msgs: list[QueuedMessage], epoch: int) -> None:
        """Record "delivery temporarily suspended" for mail to dead destinations.

        A dead destination's backlog comes due all the time (a million deferred messages
        retried about once an hour: ~280 a second). Through the attempt's path each one
        took a claim, a delivery slot and permits and read its body only to be deferred,
        and fresh mail to live destinations waited behind that work. No claim is needed:
        nothing is sent, and the scan passed over mail claimed by a lease not waited out.
        """
        try:
            recorded = await asyncio.gather(*(self._defer_one(m, epoch) for m in msgs))
            if any(recorded):
                self.wake()  # mail behind these in the due index: as after an attempt
        finally:
            for m in msgs:
                self._deferring.discard(m.queue_id)
                self._dests_seen.pop(m.queue_id, None)

    async def _defer_one(self, msg: QueuedMessage, epoch: int) -> bool:
        if not self._lease.valid(epoch):
            return False
        results: list[RecipientResult] = []
        for i, r in enumerate(msg.recipients):
            if r.state is RcptState.PENDING:
                dest = self._router.nexthop(domain_of(r.address))
                why = self._suspended.get(dest, (0.0, "destination unreachable"))[1]
                reply = f"4.4.1 delivery temporarily suspended: {why}"
                results.append((i, Outcome.DEFERRED.value, reply))
        try:
            await self._record(msg, epoch, results, {}, b"")
        except MqnodeError as exc:
            log.warning("%s: deferral not recorded: %s", msg.queue_id, exc)
            return False
        return True

    def _suspend(self, dest: str, why: str) -> None:
        if len(self._suspended) >= SUSPENDED_MAX:
            self._suspended.clear()
        until = self._clock.monotonic_s() + self._policy.retry_base_s
        if dest not in self._suspended:
            log.warning(
                "%s: a cohort of sessions failed; suspended for %.0f s: %s",
                dest,
                self._policy.retry_base_s,
                why,
            )
        self._suspended[dest] = (until, why)

    async def _take_permits(self, stack: contextlib.AsyncExitStack, dests: tuple[str, ...]) -> None:
        """A permit of each destination, taken in name order."""
        for dest in dests:  # sorted by destinations(): no two attempts wait in a cycle
            await stack.enter_async_context(self._destination(dest))

    @contextlib.asynccontextmanager
    async def _destination(self, dest: str) -> AsyncIterator[None]:
        """A permit of the destination (one of its window's sessions) for the block."""
        record = self._dests.get(dest)
        if record is None:
            if len(self._dests) >= IDLE_WINDOWS_MAX:  # forget idle ones, not those in use
                self._dests = {d: r for d, r in self._dests.items() if r.users}
            record = self._dests[dest] = _Destination(self._new_window(dest))
        record.users += 1
        try:
            await record.acquire()
            try:
                yield
            finally:
                record.release()
        finally:
            record.users -= 1
            if not record.users and not record.window.learnt:
                self._dests.pop(dest, None)

    # -- recording -------------------------------------------------------------------------
    async def _record(
        self,
        msg: QueuedMessage,
        epoch: int,
        results: list[RecipientResult],
        remote: dict[int, str],
        body: bytes,
        dsn_passed: frozenset[int] = frozenset(),
    ) -> None:
        now_ms = self._clock.wall_ms()
        expired = now_ms - msg.received_ms > self._s.max_queue_lifetime_s * 1000
        final: list[RecipientResult] = []
        for i, outcome, reply in results:
            if outcome == Outcome.DEFERRED.value and expired:
                outcome, reply = Outcome.BOUNCED.value, f"4.4.7 message expired in queue: {reply}"
            final.append((i, outcome, reply[:MAX_REPLY_CHARS]))
        dsn_id = make_queue_id(now_ms, self._random_bytes(4))
        # suppression_action "drop": a suppressed recipient is dropped without a report
        reported = [r for r in final if not self._dropped(r[2])]
        dsn = report_for(
            msg,
            reported,
            remote,
            body,
            now_ms,
            self._s.hostname,
            dsn_id,
            dsn_passed,
            sign=self._sign_report,
        )
        dsn_id = dsn_id if dsn else ""
        bounce_id = dsn_id
        delay_s = self._retry_policy(msg).delay_s(msg.attempts + 1, self._random)
        next_ms = now_ms + int(delay_s * 1000)
        for start in range(0, len(final), RESULTS_PER_COMMAND):  # keep entries small
            part = tuple(final[start : start + RESULTS_PER_COMMAND])
            cmd = RecordOutcome(msg.queue_id, now_ms, part, next_ms, epoch, dsn_id, dsn)
            dsn_id, dsn = "", b""  # the bounce rides with the first part only
            status, detail = await self._rep.submit(cmd)
            if status != "ok":
                log.warning("%s: outcome rejected: %s", msg.queue_id, detail)
                return
        hard: list[tuple[str, str, str]] = []  # (recipient, category, reply): may be suppressed
        for i, outcome, reply in final:
            self.counts[outcome] += 1
            rcpt = msg.recipients[i].address
            relay = remote.get(i, "")
            fields: dict[str, str] = {}
            if outcome != Outcome.DELIVERED.value:
                category = self._classify(_EXPIRED.sub("", reply), relay).value
                site = self.shaper.site_of(self._router.nexthop(domain_of(rcpt))).name
                key = (outcome, category, site)
                self.categories[key] = self.categories.get(key, 0) + 1
                fields["category"] = category
                if outcome == Outcome.BOUNCED.value and not reply.startswith(SUPPRESSED_REPLY):
                    hard.append((rcpt, category, reply))
            log.info("%s: to=<%s> %s: %s", msg.queue_id, rcpt, outcome, reply)
            if self.events is not None:
                event = "expired" if reply.startswith("4.4.7") else outcome
                event = "suppressed" if self._dropped(reply) else event
                self.events.emit(event, msg.queue_id, to=rcpt, relay=relay, reply=reply, **fields)
        if bounce_id and self.events is not None:
            # A report of successes only (NOTIFY=SUCCESS) is no bounce.
            failed = any(outcome == Outcome.BOUNCED.value for _, outcome, _ in final)
            event = "bounce-queued" if failed else "success-report-queued"
            self.events.emit(event, msg.queue_id, dsn_queue_id=bounce_id)
        if hard and self.auto_suppress is not None:
            await self.auto_suppress.after_bounces(msg, hard, now_ms, self.events)


class _Destination:
    """A destination's concurrency window, and the attempts holding or awaiting its permits
    (a semaphore whose size is the window's, which feedback moves)."""

    def __init__(self, window: ConcurrencyWindow) -> None:
        self.window = window
        self.users = 0  # attempts holding or waiting for a permit
        self._open = 0  # permits held
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self._open < self.window.sessions and not self._waiters:
            self._open += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # wake() counted the permit as held for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a permit just as we were cancelled
            elif waiter in self._waiters:  # (wake() drops cancelled waiters it meets)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._open -= 1
        self.wake()

    @property
    def held(self) -> int:
        return self._open

    def wake(self) -> None:
        """Hand free permits to waiters, oldest first."""
        while self._waiters and self._open < self.window.sessions:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)


class _Skip:
    """What a scan passes over without decoding: in flight here, or seen going to a full
    destination (a stale entry lists more destinations than are pending: passed over
    longer than needed, never claimed past a limit)."""

    def __init__(
        self,
        in_flight: set[str],
        seen: dict[str, tuple[str, ...]],
        full: Callable[[tuple[str, ...]], bool],
    ) -> None:
        self._in_flight = in_flight
        self._seen = seen
        self._full = full

    def __contains__(self, qid: object) -> bool:
        if qid in self._in_flight:
            return True
        dests = self._seen.get(qid) if isinstance(qid, str) else None
        return dests is not None and self._full(dests)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def destinations(msg: QueuedMessage, nexthop: Callable[[str], str]) -> tuple[str, ...]:
    """The destinations of a message's pending recipients, sorted (the order permits are
    taken in); `nexthop` maps a recipient domain to its destination (Router.nexthop)."""
    return tuple(
        sorted(
            {nexthop(domain_of(r.address)) for r in msg.recipients if r.state is RcptState.PENDING}
        )
    )
