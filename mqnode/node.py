"""Node: builds every part from a NodeConfig, wires them, runs until SIGTERM/SIGINT.

Start-up order: lock the data dir (one process per dir), check its identity,
open LMDB, bind Raft (encrypted with the cluster secret), then the admin and
SMTP listeners. Shutdown reverses it: stop accepting, let in-flight commits
finish briefly, stop the Raft tick, close LMDB. A failed writeback of the
queue state (store.sync_state, every STATE_SYNC_S) shuts the node down the
same way and exits 1; the next start rebuilds the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Callable
from typing import IO, Any

from mqnode.access.principals import Principals
from mqnode.admin.audit import Auditor
from mqnode.admin.endpoint import AdminServer
from mqnode.admin.metrics import DOMAIN_SCAN_LIMIT, MetricsSnapshot, NodeMetrics
from mqnode.admin.readiness import Readiness, assess
from mqnode.admin.shaping import ShapingRoutes
from mqnode.admin.suppressions import SuppressionRoutes
from mqnode.api.compose import Limits
from mqnode.api.server import InjectionApi
from mqnode.clock import Clock, SystemClock
from mqnode.config import NodeConfig, parse_hostport
from mqnode.delivery.auto_suppress import AutoSuppress, parse_rules
from mqnode.delivery.bounce_classes import BounceClassifier, Category
from mqnode.delivery.client import DeliveryAgent, RelayAuth
from mqnode.delivery.dispatcher import Dispatcher, DispatchSettings
from mqnode.delivery.lease import LeaderLease
from mqnode.delivery.mx import MxResolver
from mqnode.delivery.retry import RetryPolicy
from mqnode.delivery.routing import Router
from mqnode.errors import ConfigError, CorruptDataError, MqnodeError, SubmitError
from mqnode.events import EventLog
from mqnode.intake import Intake
from mqnode.raft import RaftNode, RaftSettings, RaftStatus
from mqnode.raft.commit_pipeline import CommitPipeline, Submitter
from mqnode.raft.formats import LevelGate, announce_again, announced_level, cluster_level
from mqnode.raft.member_lists import (
    ListWatch,
    disagreements,
    leader_not_listed,
    unlisted_peer,
)
from mqnode.restore import PENDING_AUDIT
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.signing.keys import KeySet
from mqnode.signing.signing_process import SigningProcess
from mqnode.smtp.front import InProcessFront, build_ingress, ingress_limits
from mqnode.smtp.handler import client_limits
from mqnode.smtp.worker_pool import WorkerPool
from mqnode.spool.commands import (
    AUDIT_LEVEL,
    MEMBERS_LEVEL,
    READS_LEVEL,
    SUPPRESS_LEVEL,
    Announce,
)
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore, StateTxn
from mqnode.tls import relay_client_context, required_client_context, server_context

log = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits for it (CPython's default
# 5 ms). A node runs two busy threads, the event loop and the Raft tick: the tick
# back from an fsync or a poll with an ack in hand waited for the loop's next
# blocking call, up to the whole interval, before it could count the commit.
# 0.5 ms: +5% acceptance in 5 of 7 alternated pairs (2 smtp workers), leader
# submit-to-commit 4.8 -> 4.6 ms (alternated A/B pairs).
GIL_SWITCH_INTERVAL_S = 0.0005
# How often the queue state's unsynced commits are written back, to learn of a failed
# writeback while the kernel still serves the pages it could not write (W27, spool/store.py).
# The kernel writes dirty pages back within ~30 s anyway: this adds few writes. Also as
# soon as the bodies held grew by `STATE_SYNC_BYTES` (applied less deleted), so that no
# sync is big: the journal's fsyncs wait behind one (100 KiB mail queued at 130 msg/s,
# every 10 s: 250 ms stalls of DATA-to-250). Not by bodies applied alone: mail delivered
# within seconds frees its pages for the next, and a sync every 16 MiB applied wrote each
# body once more (100 KiB end to end: 279 KiB written per message). Not simply every
# second: each sync writes the state's hot pages again (1 KiB: 34% more bytes).
STATE_SYNC_S = 10.0
STATE_SYNC_BYTES = 16 * 1024 * 1024
STATE_SYNC_CHECK_S = 0.25
ANNOUNCE_CHECK_S = 2.0  # see Node._keep_announced
COMMIT_PROBE_EVERY_S = 1.0  # see Node._probe_commits
SUPPRESSION_COUNT_S = 0.5  # how stale the suppression list's entry count may be (Node._suppression)


async def watch_state_writeback(
    sync: Callable[[], None],
    interval_s: float,
    failed: Callable[[MqnodeError], None],
    written: Callable[[], int] = lambda: 0,
    every_bytes: int = STATE_SYNC_BYTES,
) -> None:
    """Run `sync` on a thread every `interval_s`, or once `written()` grew by `every_bytes`
    since the last run; its first CorruptDataError goes to `failed`."""
    loop = asyncio.get_running_loop()
    check_s = min(interval_s, STATE_SYNC_CHECK_S)
    last_at, last_written = loop.time(), written()
    while True:
        await asyncio.sleep(check_s)
        now, grown = loop.time(), written()
        if now - last_at < interval_s and grown - last_written < every_bytes:
            continue
        last_at, last_written = now, grown
        try:
            await asyncio.to_thread(sync)
        except CorruptDataError as exc:
            failed(exc)
            return


def _lock_data_dir(cfg: NodeConfig) -> IO[str]:
    """Lock the data dir (one process per dir) and check whose it is.

    A dir that another node's identity (node.json) names is refused; a new dir is
    stamped only by `_stamp_data_dir`, once the node has bound its ports, so that a
    start that fails on a wrong address leaves nothing to refuse the corrected one.
    """
    path = cfg.data_path
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / "LOCK", "w")  # noqa: SIM115 - held for the process lifetime
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"data_dir: {path} (or a parent) exists and is not a directory") from exc
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot use {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise ConfigError(f"data_dir: {path} is in use by another mqnode process") from exc
    ident = path / "node.json"
    if ident.exists():
        try:
            stored = json.loads(ident.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data_dir: {ident} is unreadable: {exc}") from exc
        if stored.get("node_id") != cfg.node_id or stored.get("raft_addr") != cfg.raft_addr:
            raise ConfigError(
                f"data_dir: {path} belongs to node {stored.get('node_id')} at "
                f"{stored.get('raft_addr')}, not {cfg.node_id} at {cfg.raft_addr}"
            )
    return lock


def _stamp_data_dir(cfg: NodeConfig) -> None:
    """Write the data dir's identity (node.json) if it has none yet."""
    ident = cfg.data_path / "node.json"
    if not ident.exists():
        tmp = ident.with_suffix(".tmp")
        tmp.write_text(json.dumps({"node_id": cfg.node_id, "raft_addr": cfg.raft_addr}))
        os.replace(tmp, ident)


def check_listen_addrs(cfg: NodeConfig) -> None:
    """Refuse, in one line, a listen address this host cannot bind (in use, not its own).

    Checked before anything is written to the data dir. A port taken between this
    check and the real bind still fails the start, with the same kind of message.
    """
    keys = ["raft_addr", "smtp_addr", "admin_addr"]
    keys += [key for key in ("smtps_addr", "api_addr") if getattr(cfg, key)]
    for key in keys:
        addr = getattr(cfg, key)
        host, port = parse_hostport(addr, key)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise ConfigError(f"{key}: cannot listen on {addr}: {why}") from exc


class Node:
    def __init__(
        self,
        cfg: NodeConfig,
        clock: Clock | None = None,
        reload_config: Callable[[], NodeConfig] | None = None,
    ) -> None:
        self.cfg = cfg
        # Reads the settings again (the CLI: the same --config file and flags); a DKIM
        # reload takes the dkim_* settings from it. None: the key files named at start.
        self._reload_config = reload_config or (lambda: self.cfg)
        self._front: InProcessFront | WorkerPool | None = None
        self.clock = clock or SystemClock()
        self._rng = random.Random()
        self._stop = asyncio.Event()
        self._failure: MqnodeError | None = None
        self._announced_to: str | None = None  # the leader last announced under
        self._lists = ListWatch()  # member lists that disagree with the leader's
        self._store: QueueStore | None = None
        self._signer = DkimSigner(KeySet([]))  # the node's own reports' signer (run builds it)
        # Big messages accepted in this process are signed in a child (a reload renews it).
        self._signing = SigningProcess(self.cfg)
        self._bounces = BounceClassifier.load()  # run loads the operator's rules too
        self._suppression_count, self._suppression_count_at = 0, float("-inf")
        self._principals = Principals({}, "")  # run loads them (principals_file, admin token)
        self._api_intake: Intake | None = None
        self._api: InjectionApi | None = None
        self._auditor: Auditor | None = None
        self._sighup_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        cfg = self.cfg
        secret = cfg.read_secret()
        relay_auth = self._relay_auth()  # a bad login file or CA file stops us here
        signer = self._signer = DkimSigner.from_config(cfg)  # so does an unusable DKIM key
        self._bounces = BounceClassifier.load(cfg.bounce_rules_file)  # and a bad rules file
        suppress_days = parse_rules(cfg.suppress_bounces, {c.value for c in Category})
        self._principals = Principals.load(cfg.principals_file, "")  # and these
        api_tls = (
            server_context(cfg.api_tls_cert, cfg.api_tls_key, "api_tls_cert/api_tls_key")
            if cfg.api_tls_cert
            else None
        )
        if signer.keys:
            log.info(
                "dkim: signing for %s (key set %s)",
                ", ".join(sorted({k.domain for k in signer.keys.keys})),
                signer.keys.fingerprint(),
            )
        check_listen_addrs(cfg)
        lock = _lock_data_dir(cfg)
        loop = asyncio.get_running_loop()
        store = self._store = QueueStore(cfg.data_path / "state", cfg.state_map_size_mb)
        raft = self._raft = self._build_raft(store, secret, loop)
        _stamp_data_dir(cfg)
        pipeline = self._pipeline = CommitPipeline(
            raft,
            self.clock,
            cfg.max_pending_commits,
            cfg.commit_timeout_ms / 1000,
            entry_bytes=lambda: gate.entry_sizes().max_entry,
        )
        gate = self._gate = LevelGate(pipeline, lambda: self._reads_level(store, raft), self.clock)
        front = self._front = self._build_smtp_front(gate, store)
        if cfg.suppression_action == "refuse":  # else dispatch drops them (Dispatcher)
            front.set_suppression(self._suppression, store.suppression_count)
        # As many parked sessions per target as may deliver to it at once: with fewer,
        # a burst closed the surplus and reconnected for the next one (connect, EHLO,
        # QUIT per message cost the leader ~100 us of CPU each in the e2e bench).
        agent = DeliveryAgent(
            cfg.hostname,
            timeout_s=cfg.delivery_timeout_s,
            max_idle_per_target=cfg.per_destination_concurrency,
            relay_auth=relay_auth,
            max_rcpts_per_transaction=cfg.delivery_recipient_limit,
            required_tls=required_client_context(cfg.tls_required_ca_file),
        )
        self._lease = lease = LeaderLease(self.clock, cfg.lease_ms, cfg.lease_margin_ms)
        dispatcher = self._build_dispatcher(store, pipeline, agent, lease)
        dispatcher.suppressed = self._suppression
        dispatcher.suppression_drops = cfg.suppression_action == "drop"
        dispatcher.auto_suppress = AutoSuppress(
            pipeline,
            suppress_days,
            frozenset(d.lower() for d in cfg.suppress_bounce_exempt_domains),
            writable=self._suppression_writable,
        )
        # After the state commit, not on a 250 (which goes out before it), and for mail
        # accepted by other nodes or released by an operator too.
        raft.on_applied = dispatcher.wake
        raft.on_fatal = self._fail
        events = EventLog(cfg.event_log, cfg.node_id, self.clock, cfg.event_webhook)
        front.events = dispatcher.events = events
        metrics = self._build_metrics(store, raft, front, dispatcher, lease)
        pipeline.on_commit = metrics.commit_seconds.observe
        dispatcher.on_attempt = metrics.delivery_seconds.observe
        admin = self._build_admin(store, raft, pipeline, lease, metrics)
        admin.smtp_workers = front.describe
        admin.readiness = self._readiness
        admin.destinations = dispatcher.describe_destinations
        admin.member_lists = self._lists.confirmed
        admin.dkim = lambda: self._signer.describe()
        admin.reload_dkim = self.reload_dkim
        admin.classify = self._classify
        admin.app.add_routes(
            SuppressionRoutes(store, pipeline, self.clock, self._suppression_writable).routes()
        )
        writable = self._suppression_writable  # the same reads level (spool/commands.py)
        shaping = ShapingRoutes(store, pipeline, self.clock, writable, dispatcher.shaper.describe)
        admin.app.add_routes(shaping.routes())
        admin.sign_report = self._sign_report
        admin.reload_principals = self.reload_principals
        api = self._build_api(admin, pipeline, store, events)

        raft.start()
        pipeline.start()
        tasks = [
            asyncio.create_task(events.run_webhook(), name="event-webhook"),
            asyncio.create_task(
                watch_state_writeback(
                    store.sync_state,
                    STATE_SYNC_S,
                    self._fail,
                    lambda: store.body_bytes_held,
                ),
                name="state-writeback",
            ),
            asyncio.create_task(self._keep_announced(store, raft), name="keep-announced"),
            asyncio.create_task(self._probe_commits(), name="commit-probe"),
        ]
        pending = cfg.data_path / PENDING_AUDIT  # left by `mqnode restore`
        if pending.exists() and self._auditor is not None:
            tasks.append(asyncio.create_task(self._auditor.commit_pending(pending)))
        if cfg.delivery_enabled:
            tasks.append(asyncio.create_task(dispatcher.run(), name="dispatcher"))
        try:
            await admin.start(*parse_hostport(cfg.admin_addr, "admin_addr"))
            if cfg.api_addr:
                host, port = parse_hostport(cfg.api_addr, "api_addr")
                await api.start(host, port, lambda: self._principals, api_tls)
            await front.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_logged)
            log.info(
                "node %s up: smtp %s, admin %s, raft %s peers %s",
                cfg.node_id,
                cfg.smtp_addr,
                cfg.admin_addr,
                cfg.raft_addr,
                raft.start_peers,
            )
            await self._stop.wait()
            log.info("shutting down")
        except OSError as exc:
            raise MqnodeError(f"cannot listen: {exc}") from exc
        finally:
            await front.stop()
            for t in tasks:
                t.cancel()
            await dispatcher.stop()
            await agent.close()
            events.close()
            await pipeline.stop()
            await api.stop()
            self._signing.close()
            await admin.stop()
            await asyncio.to_thread(raft.stop)
            store.close()
            lock.close()
        if self._failure is not None:
            raise self._failure

    # -- building the parts (one job each; run() wires them) ----------------------------

    def _relay_auth(self) -> RelayAuth | None:
        login = self.cfg.relay_login()
        if login is None:
            return None
        tls = relay_client_context(self.cfg.relay_tls_ca_file)
        return RelayAuth(login[0], login[1], tls, bool(self.cfg.relay_implicit_tls))

    def _build_raft(
        self, store: QueueStore, secret: str, loop: asyncio.AbstractEventLoop
    ) -> RaftNode[StateTxn]:
        cfg = self.cfg
        settings = RaftSettings(
            self_addr=cfg.raft_addr,
            peers=cfg.peers,
            secret=secret,
            data_dir=cfg.data_path,
            election_timeout_min_ms=cfg.election_timeout_min_ms,
            election_timeout_max_ms=cfg.election_timeout_max_ms,
            heartbeat_ms=cfg.heartbeat_ms,
            replication_batch_ms=cfg.replication_batch_ms,
            leader_fallback_ms=cfg.leader_fallback_ms,
            log_compaction_min_entries=cfg.log_compaction_min_entries,
            log_compaction_min_time_s=cfg.log_compaction_min_time_s,
            raft_map_size_mb=cfg.raft_map_size_mb,
            join=bool(cfg.join),
        )
        return RaftNode(
            settings, store, QueueStateMachine(), loop, on_status_change=self._on_raft_status
        )

    @staticmethod
    def _reads_level(store: QueueStore, raft: RaftNode[StateTxn]) -> int:
        with store.reader() as r:
            nodes = r.get_meta("nodes", {})
        return cluster_level(nodes, raft.status.members)

    def _build_smtp_front(self, gate: LevelGate, store: QueueStore) -> InProcessFront | WorkerPool:
        """SMTP sessions in this process, or in a pool of worker processes."""
        cfg = self.cfg
        if not cfg.smtp_workers:
            ingress = build_ingress(cfg, gate, self.clock, self._rng.randbytes, store.fill_ratio)
            ingress.intake.sizes = gate.entry_sizes
            ingress.intake.sign_away = self._signing.sign
            return InProcessFront(cfg, ingress)
        limits = client_limits(ingress_limits(cfg), self.clock)
        pool = WorkerPool(cfg, gate, limits, store.fill_ratio, self.clock)
        pool.level = gate.level
        return pool

    def _build_dispatcher(
        self,
        store: QueueStore,
        pipeline: CommitPipeline,
        agent: DeliveryAgent,
        lease: LeaderLease,
    ) -> Dispatcher:
        cfg = self.cfg
        relay = parse_hostport(cfg.relay_host, "relay_host") if cfg.relay_host else None
        resolver = None
        if relay is None:
            ns = parse_hostport(cfg.dns_server, "dns_server") if cfg.dns_server else None
            resolver = MxResolver(
                ns,
                timeout_s=cfg.dns_timeout_ms / 1000,
                rng=self._rng,
                # never remember a DNS failure longer than we wait before retrying
                temp_fail_ttl_s=min(30.0, float(cfg.retry_base_s)),
            )
        settings = DispatchSettings(
            node_id=cfg.node_id,
            raft_addr=cfg.raft_addr,
            hostname=cfg.hostname,
            concurrency=cfg.delivery_concurrency,
            per_destination=cfg.per_destination_concurrency,
            initial_per_destination=cfg.initial_destination_concurrency,
            destination_limits=cfg.destination_limits(),
            max_queue_lifetime_s=cfg.max_queue_lifetime_s,
            tls_required_domains=frozenset(d.lower() for d in cfg.tls_required_domains),
        )
        return Dispatcher(
            settings,
            store,
            pipeline,
            agent,
            Router(relay, resolver, cfg.delivery_port, relay_secure=bool(cfg.relay_auth_file)),
            lease,
            self.clock,
            RetryPolicy(cfg.retry_base_s, cfg.retry_max_s),
            self._rng.random,
            self._rng.randbytes,
            sign_report=self._sign_report,
            classify=self._classify,
        )

    def _build_metrics(
        self,
        store: QueueStore,
        raft: RaftNode[StateTxn],
        front: InProcessFront | WorkerPool,
        dispatcher: Dispatcher,
        lease: LeaderLease,
    ) -> NodeMetrics:
        def snapshot() -> MetricsSnapshot:
            st = raft.status
            accepted, refused = front.counts()
            signed, sign_failures = front.dkim_counts()
            api, intake = self._api, self._api_intake
            if intake is not None:  # the API signs too
                signed = {
                    d: signed.get(d, 0) + intake.dkim_signed.get(d, 0)
                    for d in {*signed, *intake.dkim_signed}
                }
                sign_failures += intake.dkim_failed
            return MetricsSnapshot(
                queue_by_state=store.counts(),
                queue_by_domain=store.domain_counts(DOMAIN_SCAN_LIMIT),
                smtp_accepted=accepted,
                smtp_refused=refused,
                outcomes=dict(dispatcher.counts),
                bounce_categories=dict(dispatcher.categories),
                sites=dispatcher.shaper.describe(),
                suppressed_refused=front.suppressed_refused(),
                suppression_entries=store.suppression_count(),
                role=st.role,
                term=st.term,
                commit_index=st.commit_index,
                last_applied=st.last_applied,
                has_quorum=st.has_quorum,
                lease_held=lease.valid(),
                store_fill_ratio=store.fill_ratio(),
                replication_lag={p: st.commit_index - m for p, m in st.match_index.items()},
                destinations_suspended=dispatcher.suspended_count(),
                dkim_signed=signed,
                dkim_failures=sign_failures,
                api_accepted=api.accepted if api else 0,
                api_refused=api.refused if api else 0,
            )

        return NodeMetrics(snapshot)

    def _build_admin(
        self,
        store: QueueStore,
        raft: RaftNode[StateTxn],
        pipeline: CommitPipeline,
        lease: LeaderLease,
        metrics: NodeMetrics,
    ) -> AdminServer:
        cfg = self.cfg
        self._principals = self._principals.with_admin_token(cfg.admin_token())
        info = {
            "node_id": cfg.node_id,
            "raft_addr": cfg.raft_addr,
            "smtp_addr": cfg.smtp_addr,
            "admin_addr": cfg.admin_addr,
            "hostname": cfg.hostname,
        }
        return AdminServer(
            info,
            store,
            raft,
            lease_held=lease.valid,
            replicator=pipeline,
            clock=self.clock,
            metrics=metrics,
            principals=lambda: self._principals,
            public_status=cfg.public_status,
            fault_injection=bool(cfg.fault_injection),
        )

    def _on_raft_status(self, status: RaftStatus) -> None:
        log.info("raft: %s, term %d, leader %s", status.role, status.term, status.leader_addr)
        if status.role == "leader":
            self._lease.on_leadership(status.term)
        else:
            self._lease.on_step_down()
        # Every node tells the cluster who it is (node id, SMTP and admin addresses) and
        # what it reads, under each leader it sees: `mqnode cluster status`, leader ids in
        # /status and the cluster's reads level (raft/formats.py) come from these entries. Under
        # each leader, not once: a member that skipped an entry while it ran an older
        # release (the first release cannot decode `reads`) learns it again.
        self._maybe_announce(status, again=status.role == "leader")

    def _maybe_announce(self, status: RaftStatus, again: bool) -> None:
        """Announce under `status`'s leader, unless done already (or `again`)."""
        leader = status.leader_addr
        if leader is not None and (again or self._announced_to != leader):
            self._announced_to = leader
            task = asyncio.get_running_loop().create_task(self._announce(self._announcement()))
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    def _announcement(self) -> Announce:
        """This node's Announce. Its member list only once every member that announced
        reads level 3 (raft/formats.py announced_level): a member of an earlier release
        would stop at an Announce with one more field."""
        cfg, status = self.cfg, self._raft.status
        store = self._store
        lists = False
        if store is not None:
            with store.reader() as r:
                nodes = r.get_meta("nodes", {})
            lists = announced_level(nodes, status.members) >= MEMBERS_LEVEL
        members = tuple(sorted(status.members)) if lists else ()
        return Announce(
            cfg.raft_addr,
            cfg.node_id,
            cfg.smtp_addr,
            cfg.admin_addr,
            status.term,
            READS_LEVEL,
            members,
        )

    async def _keep_announced(self, store: QueueStore, raft: RaftNode[StateTxn]) -> None:
        """Announce again when the state's entry for this node is not what it announces,
        or when another member's reads level went up; and compare the members' lists.

        A member that ran the first release skipped our Announce (it cannot decode
        `reads`); once upgraded, it has our entry only if we say it again (seen in
        `python -m bench.upgrade`: the old leader, upgraded last, kept reads level 1).
        A snapshot from such a member can replace our own entry here too. Once per
        ANNOUNCE_CHECK_S, one state read; levels only rise, so this settles (after a
        start, the first check counts every member above level 1 as a rise: one more
        Announce per start, which covers a member upgraded just before it).
        """
        cfg = self.cfg
        mine = {"node_id": cfg.node_id, "smtp_addr": cfg.smtp_addr, "reads": READS_LEVEL}
        seen: dict[str, int] = {}  # so the first check counts any upgraded member as new
        while True:
            await asyncio.sleep(ANNOUNCE_CHECK_S)
            with store.reader() as r:
                nodes: dict[str, Any] = r.get_meta("nodes", {})
            listed = self._announcement().members
            now_mine = {**mine, "members": list(listed)} if listed else mine
            again, seen = announce_again(nodes, seen, cfg.raft_addr, now_mine)
            if again:
                self._maybe_announce(raft.status, again=True)
            self._check_member_lists(nodes, raft.status.leader_addr)

    def _check_member_lists(self, nodes: dict[str, Any], leader_addr: str | None) -> None:
        """Log, once, a member list that has disagreed with the leader's for GRACE_S."""
        status = self._raft.status
        found = [d.describe() for d in disagreements(nodes, leader_addr)]
        me, members = self.cfg.raft_addr, status.members
        followed = status.leader_addr or status.leader_named_by_others
        own = leader_not_listed(me, members, followed)
        found += [own] if own else []
        found += [unlisted_peer(me, members, peer) for peer in status.unlisted_peers]
        new, gone = self._lists.update(self.clock.monotonic_s(), found)
        for text in new:
            log.error("member lists disagree: %s", text)
        for text in gone:
            log.info("member lists agree again (was: %s)", text)

    def _sign_report(self, report: bytes, at_s: int) -> bytes:
        return self._signer.sign_report(report, at_s)  # the signer of the moment (reloads)

    def reload_dkim(self) -> dict[str, Any]:
        """Sign with the DKIM keys as the settings name them now (SIGHUP, POST /dkim/reload).

        All or nothing: the settings are read again and every key file loaded and checked
        before anything changes; a ConfigError (naming the file) leaves the old keys in
        use, here and in the SMTP workers. Messages already queued keep their signatures.
        """
        settings = DkimSigner.settings(self._reload_config())
        signer = DkimSigner.from_config(dataclasses.replace(self.cfg, **settings))
        self.cfg = dataclasses.replace(self.cfg, **settings)
        self._signer = signer
        self._signing.reload(self.cfg)
        if self._front is not None:
            self._front.set_dkim(settings)
        if self._api_intake is not None:
            self._api_intake.signer = self._api_signer()
        view = signer.describe()
        log.info(
            "dkim: reloaded; signing for %s (key set %s)",
            ", ".join(view["domains"]) or "no domain",
            view["key_set"] or "empty",
        )
        return view

    def _suppression(self, recipient: str, sender_domain: str) -> str | None:
        """Why mail from `sender_domain` to `recipient` is suppressed, or None.

        Asked at every RCPT TO and every delivery: with an empty list (most nodes) no
        lookup is made, the entry count being read again at most every
        SUPPRESSION_COUNT_S (as the SMTP workers learn it)."""
        assert self._store is not None
        now = self.clock.monotonic_s()
        if now >= self._suppression_count_at + SUPPRESSION_COUNT_S:
            self._suppression_count = self._store.suppression_count()
            self._suppression_count_at = now
        if not self._suppression_count:
            return None
        entry = self._store.suppressed(recipient, sender_domain, self.clock.wall_ms())
        return None if entry is None else entry.why()

    def _suppression_writable(self) -> bool:
        """Whether every member reads Suppress commands (raft/formats.py)."""
        assert self._store is not None
        return self._reads_level(self._store, self._raft) >= SUPPRESS_LEVEL

    def _build_api(
        self, admin: AdminServer, pipeline: Submitter, store: QueueStore, events: EventLog
    ) -> InjectionApi:
        """The injection API (served on the admin endpoint too) and the audit trail."""
        cfg = self.cfg
        rng = self._rng.randbytes
        intake = self._api_intake = Intake(
            pipeline, self.clock, rng, cfg.node_id, cfg.hostname, self._api_signer()
        )
        intake.events = events
        intake.sizes = self._gate.entry_sizes
        intake.sign_away = self._signing.sign
        intake.hopcount_limit = cfg.hopcount_limit
        limits = Limits(
            cfg.max_message_bytes,
            cfg.max_recipients,
            cfg.max_header_count,
            cfg.api_max_batch,
            cfg.hostname,
            cfg.hopcount_limit,
        )
        api = self._api = InjectionApi(
            intake,
            limits,
            self.clock,
            rng,
            store.fill_ratio,
            max_inflight=max(1, cfg.max_pending_commits // 4),
            wait_s=cfg.commit_timeout_ms / 1000,
        )
        if cfg.suppression_action == "refuse":
            api.suppressed = self._suppression
        admin.app.add_routes(api.routes())
        auditor = self._auditor = Auditor(
            pipeline,
            self.clock,
            cfg.node_id,
            cfg.audit_keep_days,
            lambda: self._audit_readiness(store),
        )
        auditor.events = events
        admin.app.middlewares.append(auditor.middleware())
        admin.app.add_routes(auditor.routes(store))
        return api

    def _audit_readiness(self, store: QueueStore) -> str:
        """Whether every member reads Audit: "ready", "older" (one cannot: a rolling
        upgrade) or "unknown" (one has not announced yet)."""
        with store.reader() as r:
            nodes = r.get_meta("nodes", {})
        members = self._raft.status.members
        if cluster_level(nodes, members) >= AUDIT_LEVEL:
            return "ready"
        return "older" if announced_level(nodes, members) < AUDIT_LEVEL else "unknown"

    def _api_signer(self) -> DkimSigner | None:
        return self._signer if self._signer.keys else None

    def reload_principals(self) -> int:
        """Check credentials against the principals file as the settings name it now
        (SIGHUP, POST /principals/reload); all or nothing. Returns how many there are."""
        path = self._reload_config().principals_file
        principals = Principals.load(path, self.cfg.admin_token())
        self.cfg = dataclasses.replace(self.cfg, principals_file=path)
        self._principals = principals
        log.info("principals: reloaded; %d in %s", len(principals), path or "(admin token only)")
        return len(principals)

    async def _reload_principals_audited(self, principal: str) -> int:
        """A reload without a request (SIGHUP), recorded in the audit trail first, as the
        admin endpoint's middleware records POST /principals/reload."""
        if self._auditor is not None:
            path = self._reload_config().principals_file
            await self._auditor.record(principal, "principals/reload", path)
        return self.reload_principals()

    def _classify(self, reply: str, host: str) -> Category:
        return self._bounces.classify(reply, host)  # the rules of the moment (reloads)

    def reload_bounce_rules(self) -> int:
        """Classify with the bounce rules file as the settings name it now (SIGHUP); all or
        nothing, as reload_dkim. Returns the number of rules in use."""
        path = self._reload_config().bounce_rules_file
        classifier = BounceClassifier.load(path)
        self.cfg = dataclasses.replace(self.cfg, bounce_rules_file=path)
        self._bounces = classifier
        log.info("bounce rules: reloaded; %d rules (%s)", len(classifier.rules), path or "shipped")
        return len(classifier.rules)

    def _reload_logged(self) -> None:
        """SIGHUP: the DKIM keys, the bounce rules and the principals, each all or nothing."""
        task = asyncio.get_running_loop().create_task(self._sighup_principals())
        self._sighup_tasks.add(task)
        task.add_done_callback(self._sighup_tasks.discard)
        try:
            self.reload_dkim()
        except ConfigError as exc:
            log.error("dkim reload refused, signing with the keys as they were: %s", exc)
        try:
            self.reload_bounce_rules()
        except ConfigError as exc:
            log.error("bounce rules reload refused, classifying as before: %s", exc)

    async def _sighup_principals(self) -> None:
        try:
            await self._reload_principals_audited("signal")
        except (ConfigError, SubmitError) as exc:
            log.error("principals reload refused, checking credentials as before: %s", exc)

    def _readiness(self) -> Readiness:
        workers = self._front.up() if self._front is not None else (0, 0)
        return assess(self._raft.status, self._pipeline.health(), workers)

    async def _probe_commits(self) -> None:
        """While the last commit here timed out, try one again every COMMIT_PROBE_EVERY_S.

        /readyz says no while commits time out (admin/readiness.py), so a load balancer
        sends nothing, and without a probe nothing would show that commits work again.
        The probe is this node's Announce (idempotent: the state keeps one per member,
        and a member of any release reads it). Logs each change of readiness.
        """
        was: Readiness | None = None
        while True:
            await asyncio.sleep(COMMIT_PROBE_EVERY_S)
            now = self._readiness()
            if was is not None and now.ready != was.ready:
                if now.ready:
                    log.info("ready (was not: %s)", "; ".join(was.reasons))
                else:
                    log.warning("not ready: %s", "; ".join(now.reasons))
            was = now
            status = self._raft.status
            if self._pipeline.health().timing_out and status.leader_addr is not None:
                with contextlib.suppress(MqnodeError):
                    await self._pipeline.submit(self._announcement())

    async def _announce(self, cmd: Announce) -> None:
        try:
            await self._pipeline.submit(cmd)
        except MqnodeError as exc:
            self._announced_to = None  # try again at the next status change
            log.warning("announce not committed: %s", exc)

    def request_stop(self) -> None:
        self._stop.set()

    def _fail(self, exc: MqnodeError) -> None:
        """Shut down as on SIGTERM, then exit with `exc` (the CLI's exit code 1)."""
        log.critical("%s: shutting down", exc)
        self._failure = exc
        self._stop.set()
