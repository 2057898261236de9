"""Admin HTTP endpoint (aiohttp) on `admin_addr`: status and queue inspection.

    GET  /status           node, Raft and queue summary (what `mqnode status` prints)
    GET  /queue            ?state=active|deferred|hold&domain=D&sender=S&limit=N (default
                           1000, max 100000): like `postqueue -p`; sender "<>": bounces
    GET  /queue/{id}       one message: envelope, per-recipient status, attempts
    GET  /queue/{id}/body  the stored message as it will be sent (like postcat)
    POST /queue/{op}       op = hold | release | delete | retry | bounce (like postsuper
                           -h/-H/-d, postqueue -i; bounce returns them with a DSN):
                           {"ids": [...]} or {"state", "domain", "sender"} selects
                           (every match, admin/selection.py); the change is committed
                           through the log, so every node applies it. Answers {"op",
                           "count", "affected": [the first AFFECTED_LISTED ids]}.
    GET  /metrics          Prometheus text format (see admin/metrics.py)
    GET  /healthz          200 while the process runs
    GET  /readyz           200 when a submission here would commit now (admin/readiness.py:
                           quorum, leader heard, last commit did not time out), else
                           503 with the reasons
    POST /raft/compact     ask for a log compaction (snapshot) now
    POST /dkim/reload      sign with the DKIM keys as the settings name them now (as
                           SIGHUP): 200 with the key set, 400 naming a file that cannot
                           be used (the old keys stay)
    POST /raft/transfer-leadership  {"to": "host:port"} or {}: leader hands over to a
                           caught-up follower (Raft TimeoutNow); 409 on a follower
    POST /raft/add-node    {"addr": "host:port", "timeout_s": 10}: leader only; adds
    POST /raft/remove-node the Raft address as a member / removes it, one change at a
                           time (raft/membership_rules.py), answering once committed:
                           {"op", "addr", "members", "quorum"}. 400 bad address, 409
                           not the leader (the error names it) or refused, 504 not
                           committed in time (it may still commit), 503 discarded.
                           add-node first checks something listens at the address.
    POST /fault/partition  {"block": ["host:port", ...]}: drop Raft traffic with
                           those peers (only with `fault_injection = true`; tests)
    POST /fault/reset      {"peers": ["host:port", ...]}: close the Raft connections
                           with those peers once, as a link reset does (same rule)

    GET  /audit            ?since_ms=&principal=&limit=: the audit trail (admin/audit.py)
    POST /principals/reload  read the principals file again (as SIGHUP)

Binds to loopback by default. Every route needs a role (access/policy.py
ROUTE_ROLES), given by `Authorization: Bearer <token>`: the node's admin token
(role admin) or a principal's key (access/principals.py); /healthz and
/readyz never do, /status and /metrics only with `public_status = false` (no
message data in them). Every POST is recorded in the audit trail before it
runs (admin/audit.py).
Selections are made from this node's copy of
the queue and submitted as explicit ids, so apply stays deterministic.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web

from mqnode.access.policy import guard, unassigned
from mqnode.access.principals import Principals
from mqnode.admin.json_body import json_body
from mqnode.admin.metrics import NodeMetrics
from mqnode.admin.readiness import Readiness, assess
from mqnode.admin.selection import Filter, select_ids, select_messages
from mqnode.api.problems import refusal
from mqnode.clock import Clock
from mqnode.config import parse_hostport
from mqnode.dsn.notify import report_for
from mqnode.errors import ConfigError, MembershipError, SubmitError
from mqnode.raft import RaftNode, membership_rules
from mqnode.raft.commit_pipeline import PipelineHealth, Replicator
from mqnode.raft.formats import cluster_level
from mqnode.signing.keys import HEADER_SCAN_BYTES, signing_domains
from mqnode.spool.commands import QUEUE_OPS, READS_LEVEL, QueueOp, RecordOutcome
from mqnode.spool.model import Outcome, RcptState, make_queue_id
from mqnode.spool.statemachine import QueueStateMachine
from mqnode.spool.store import QueueStore

MAX_LIST = 100_000
IDS_PER_COMMAND = 500  # keeps each log entry small
OPS_IN_FLIGHT = 4  # a queue operation's commands committing at once
BOUNCES_IN_FLIGHT = 32  # bounce's commands (one per message, with its DSN) committing at once
AFFECTED_LISTED = 10_000  # ids an operation's answer lists (its "count" is all of them)
MEMBERSHIP_TIMEOUT_S = 10.0  # default wait for a membership change to commit
MEMBERSHIP_MAX_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 2.0  # add-node: something must accept a TCP connection at the address
_MEMBERSHIP_HTTP = {"invalid": 400, "not_leader": 409, "refused": 409, "timeout": 504}


class AdminServer:
    def __init__(
        self,
        node_info: dict[str, str],
        store: QueueStore,
        raft: RaftNode[Any],
        lease_held: Callable[[], bool],
        replicator: Replicator,
        clock: Clock,
        metrics: NodeMetrics,
        principals: Callable[[], Principals],
        public_status: bool = True,
        fault_injection: bool = False,
    ) -> None:
        # the node's SMTP worker processes (smtp.worker_pool.WorkerPool.describe); None: none
        self.smtp_workers: Callable[[], dict[str, Any] | None] = lambda: None
        # suspended destinations and sessions per destination (Dispatcher.describe_destinations)
        self.destinations: Callable[[], dict[str, Any]] = lambda: {}
        # members whose list has disagreed with the leader's for a while (raft/member_lists.py)
        self.member_lists: Callable[[], list[str]] = lambda: []
        # DKIM: this node's key set (DkimSigner.describe) and the signer of its own reports
        self.dkim: Callable[[], dict[str, Any]] = lambda: {}
        self.sign_report: Callable[[bytes, int], bytes] | None = None
        self.reload_dkim: Callable[[], dict[str, Any]] | None = None
        # read the principals file again (the audit middleware recorded the request)
        self.reload_principals: Callable[[], int] | None = None
        # the bounce category of a reply (delivery/bounce_classes.py), for `queue show`
        self.classify: Callable[[str, str], Any] | None = None
        # readiness.assess over this node's Raft status and commit pipeline (set by Node)
        self.readiness: Callable[[], Readiness] = lambda: assess(
            raft.status, PipelineHealth(None, None, 0, None)
        )
        self._metrics = metrics
        self._rep = replicator
        self._clock = clock
        self._info = node_info
        self._store = store
        self._raft = raft
        self._lease_held = lease_held
        self.app = web.Application(middlewares=[guard(principals, lambda: public_status, _refusal)])
        self.app.add_routes(
            [
                web.get("/status", self._status),
                web.get("/metrics", self._metrics_page),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/queue", self._list),
                web.get("/queue/{id}", self._show),
                web.get("/queue/{id}/body", self._body),
                web.post("/queue/{op}", self._operate),
                web.post("/raft/compact", self._compact),
                web.post("/dkim/reload", self._reload_dkim),
                web.post("/principals/reload", self._reload_principals),
                web.post("/raft/transfer-leadership", self._transfer),
                web.post("/raft/add-node", self._change_membership),
                web.post("/raft/remove-node", self._change_membership),
            ]
        )
        if fault_injection:
            self.app.add_routes(
                [
                    web.post("/fault/partition", self._partition),
                    web.post("/fault/reset", self._reset),
                ]
            )
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        if missing := unassigned(self.app):
            raise ConfigError(f"admin endpoint: routes without a role: {', '.join(missing)}")
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def status(self) -> dict[str, Any]:
        st = self._raft.status
        readiness = self.readiness()
        with self._store.reader() as r:
            nodes: dict[str, Any] = r.get_meta("nodes", {})
        leader = nodes.get(st.leader_addr or "", {})
        leader_addr = st.leader_addr if st.has_quorum else None  # isolated: no leader known
        if st.role == "leader":
            leader_id: str | None = self._info["node_id"]
        elif leader_addr is None:
            leader_id = None
        else:
            leader_id = leader.get("node_id") or leader_addr
        return {
            **self._info,
            "role": st.role,
            "leader_id": leader_id,
            "leader_raft_addr": leader_addr,
            "term": st.term,
            "commit_index": st.commit_index,
            "last_applied": st.last_applied,
            "has_quorum": st.has_quorum,
            "log_entries": st.log_len,
            "log_first_index": st.log_first_index,
            "log_last_index": st.log_last_index,
            "snapshot_after_entries": st.snapshot_after_entries,
            "queue": self._store.counts(),
            "lease_held": self._lease_held(),
            "nodes": nodes,
            "match_index": st.match_index,
            "peer_last_heard_s": st.peer_last_heard_s,
            "members": list(st.members),
            # What this node reads, and the lowest any member announced (raft/formats.py): DSN
            # parameters are kept once the latter is 2.
            "reads_level": READS_LEVEL,
            "cluster_reads_level": cluster_level(nodes, st.members),
            "quorum": membership_rules.quorum(len(st.members)),
            "smtp_workers": self.smtp_workers(),
            "destinations": self.destinations(),
            "ready": readiness.ready,
            "not_ready_because": list(readiness.reasons),
            "leader_heard_s": st.leader_heard_s,
            "member_lists_disagree": self.member_lists(),
            "dkim": self.dkim(),
        }

    async def _bounce(self, ids: list[str]) -> web.Response:
        """Return messages to their senders (postsuper -r-like bounce): a DSN per message.

        Recorded as an outcome in the current lease epoch, so it is fenced like any
        delivery result; a message being delivered right now may still arrive too. A
        message's DSN carries its own text, so each is a command of its own, and
        `BOUNCES_IN_FLIGHT` of them commit at once: one at a time, each waiting for its
        own commit, a dead destination's backlog took as many commit round trips as it
        had messages.
        """
        affected: list[str] = []
        with self._store.reader() as r:
            epoch = QueueStateMachine.lease_epoch(r)
        # Once each: two outcomes built before either committed would queue two DSNs.
        ids = list(dict.fromkeys(ids))
        for start in range(0, len(ids), BOUNCES_IN_FLIGHT):
            window = [
                self._bounce_command(qid, epoch) for qid in ids[start : start + BOUNCES_IN_FLIGHT]
            ]
            commands = [c for c in window if c is not None]
            answers = await asyncio.gather(
                *(self._rep.submit(cmd) for cmd in commands), return_exceptions=True
            )
            failed = ""
            for cmd, answer in zip(commands, answers, strict=True):
                if isinstance(answer, SubmitError):
                    failed = failed or str(answer)
                elif isinstance(answer, BaseException):
                    raise answer
                elif answer[0] == "ok":
                    affected.append(cmd.queue_id)
            if failed:
                return _affected("bounce", affected, failed, 503)
        return _affected("bounce", affected)

    def _bounce_command(self, qid: str, epoch: int) -> RecordOutcome | None:
        """The outcome that bounces `qid`'s pending recipients, with its DSN; None if gone."""
        msg = self._store.get_message(qid)
        if msg is None:
            return None
        now_ms = self._clock.wall_ms()
        reply = "5.0.0 returned to sender by the mail administrator"
        results = [
            (i, Outcome.BOUNCED.value, reply)
            for i, rcpt in enumerate(msg.recipients)
            if rcpt.state is RcptState.PENDING
        ]
        dsn_id = make_queue_id(now_ms, secrets.token_bytes(4))
        body = self._store.read_body(msg)
        hostname = self._info["hostname"]
        dsn = report_for(msg, results, {}, body, now_ms, hostname, dsn_id, sign=self.sign_report)
        return RecordOutcome(qid, now_ms, tuple(results), now_ms, epoch, dsn_id if dsn else "", dsn)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        st = self._raft.status
        r = self.readiness()
        return web.json_response(
            {"ready": r.ready, "role": st.role, "leader": st.leader_addr, "why_not": r.reasons},
            status=200 if r.ready else 503,
        )

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = min(int(request.query.get("limit", "1000")), MAX_LIST)
            q = request.query
            wanted = Filter.parse(q.get("state"), q.get("domain"), q.get("sender"))
        except ValueError:
            return web.json_response({"error": "bad state or limit"}, status=400)
        await self._raft.answered_readable()  # what was answered 250 is listed
        msgs = await asyncio.to_thread(select_messages, self._store, wanted, limit)
        return web.json_response({"messages": [m.summary() for m in msgs]})

    async def _operate(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        if op not in (*QUEUE_OPS, "bounce"):
            return web.json_response({"error": f"unknown operation {op!r}"}, status=404)
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            await self._raft.answered_readable()  # mail answered 250 is selected and found
            ids = body.get("ids")
            if ids is None:
                wanted = Filter.parse(body.get("state"), body.get("domain"), body.get("sender"))
                ids = await asyncio.to_thread(select_ids, self._store, wanted)
            if not isinstance(ids, list) or not all(
                isinstance(i, str) and i.isascii() for i in ids
            ):
                raise ValueError("ids must be a list of queue ids")
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if op == "bounce":
            return await self._bounce(ids)
        affected: list[str] = []
        parts = [tuple(ids[k : k + IDS_PER_COMMAND]) for k in range(0, len(ids), IDS_PER_COMMAND)]
        for start in range(0, len(parts), OPS_IN_FLIGHT):  # the pipeline keeps their order
            window = parts[start : start + OPS_IN_FLIGHT]
            answers = await asyncio.gather(
                *(self._rep.submit(QueueOp(op, p, self._clock.wall_ms())) for p in window),
                return_exceptions=True,
            )
            for answer in answers:
                if isinstance(answer, SubmitError):
                    return _affected(op, affected, str(answer), 503)
                if isinstance(answer, BaseException):
                    raise answer
                status, done = answer
                if status != "ok":
                    return _affected(op, affected, done, 400)
                affected += [i for i in done.split(",") if i]
        return _affected(op, affected)

    async def _show(self, request: web.Request) -> web.Response:
        await self._raft.answered_readable()
        msg = self._store.get_message(request.match_info["id"])
        if msg is None:
            return web.json_response({"error": "no such message"}, status=404)
        # Which domains signed it (DKIM-Signature d=), read from the stored header.
        signed = signing_domains(self._store.read_head(msg, HEADER_SCAN_BYTES))
        view = {**msg.summary(), "dkim_domains": signed}
        if self.classify is not None:  # what each recipient's last failure means
            for r in view["recipients"]:
                if r["last_reply"] and r["state"] != "delivered":
                    r["category"] = str(self.classify(r["last_reply"], ""))
        return web.json_response(view)

    async def _reload_dkim(self, request: web.Request) -> web.Response:
        if self.reload_dkim is None:
            return web.json_response({"error": "no DKIM reload here"}, status=404)
        try:
            return web.json_response(self.reload_dkim())
        except ConfigError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _reload_principals(self, request: web.Request) -> web.Response:
        if self.reload_principals is None:
            return web.json_response({"error": "principals reload not available"}, status=503)
        try:
            count = self.reload_principals()
        except ConfigError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"principals": count})

    async def _body(self, request: web.Request) -> web.Response:
        await self._raft.answered_readable()
        msg = self._store.get_message(request.match_info["id"])
        if msg is None:
            return web.json_response({"error": "no such message"}, status=404)
        body = self._store.read_body(msg)
        return web.Response(body=body, content_type="message/rfc822")

    async def _transfer(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request) if request.body_exists else {}
            target = body.get("to") if isinstance(body, dict) else None
            if target is not None:
                if not isinstance(target, str):
                    raise ValueError("to must be host:port")
                parse_hostport(target, "to")
        except ConfigError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self._raft.status.role != "leader":
            return self._not_leader(self._raft.status.leader_addr)
        outcome = await self._raft.transfer_leadership(target)
        code = 200 if outcome == "requested" else 409
        return web.json_response({"result": outcome, "to": target}, status=code)

    def _not_leader(self, leader_addr: str | None) -> web.Response:
        """409 naming the leader (id, Raft and admin address as it announced them)."""
        with self._store.reader() as r:
            nodes: dict[str, Any] = r.get_meta("nodes", {})
        me = self._info["node_id"]
        info = nodes.get(leader_addr or "", {})
        admin = info.get("admin_addr")
        if leader_addr is None:
            text = f"{me} is not the leader and knows of none (election running or no quorum)"
        else:
            text = (
                f"{me} is not the leader; the leader is {info.get('node_id', '?')} "
                f"(raft {leader_addr}, admin {admin or 'not announced'})"
            )
        body = {"error": text, "leader": leader_addr, "leader_admin": admin}
        return web.json_response(body, status=409)

    async def _change_membership(self, request: web.Request) -> web.Response:
        op = membership_rules.ADD if request.path.endswith("/add-node") else membership_rules.REMOVE
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            addr = membership_rules.check_addr(body.get("addr"))
            timeout_s = body.get("timeout_s", MEMBERSHIP_TIMEOUT_S)
            if (
                not isinstance(timeout_s, int | float)
                or isinstance(timeout_s, bool)
                or not 0 < timeout_s <= MEMBERSHIP_MAX_TIMEOUT_S
            ):
                raise ValueError(
                    f"timeout_s: a number of seconds in (0, {MEMBERSHIP_MAX_TIMEOUT_S:g}]"
                )
        except (ValueError, MembershipError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self._raft.status.role != "leader":
            return self._not_leader(self._raft.status.leader_addr)
        if op == membership_rules.ADD and not await _accepts_connections(addr, PROBE_TIMEOUT_S):
            text = (
                f"nothing accepts connections at {addr}: start the new node first "
                "(with join = true and peers = the current members), then add it"
            )
            return web.json_response({"error": text}, status=409)
        try:
            up = op == membership_rules.ADD  # checked just above
            members = await self._raft.change_membership(op, addr, float(timeout_s), up)
        except MembershipError as exc:
            if exc.kind == "not_leader":
                return self._not_leader(exc.leader)
            status = _MEMBERSHIP_HTTP.get(exc.kind, 503)
            return web.json_response({"error": str(exc), "kind": exc.kind}, status=status)
        return web.json_response(
            {
                "op": op,
                "addr": addr,
                "members": members,
                "quorum": membership_rules.quorum(len(members)),
            }
        )

    async def _compact(self, request: web.Request) -> web.Response:
        self._raft.force_compaction()
        self._raft.wake()
        return web.json_response({"ok": True})

    async def _partition(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        blocked = body.get("block", []) if isinstance(body, dict) else None
        if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
            return web.json_response({"error": "block must be a list of host:port"}, status=400)
        self._raft.set_partition(blocked)
        return web.json_response({"blocked": blocked})

    async def _reset(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        peers = body.get("peers", []) if isinstance(body, dict) else None
        if not isinstance(peers, list) or not all(isinstance(b, str) for b in peers):
            return web.json_response({"error": "peers must be a list of host:port"}, status=400)
        self._raft.reset_connections(peers)
        return web.json_response({"reset": peers})


def _refusal(
    request: web.Request, status: int, why: str, headers: dict[str, str]
) -> web.StreamResponse:
    if request.path.startswith("/v1/"):  # the injection API's, as on its own listener
        return refusal(request, status, why, headers)
    return web.json_response({"error": why}, status=status, headers=headers)


async def _accepts_connections(addr: str, timeout_s: float) -> bool:
    """True if a TCP connection to `addr` opens within `timeout_s` (it is closed at once)."""
    host, port = parse_hostport(addr, "addr")
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True


def _affected(op: str, ids: list[str], error: str = "", status: int = 200) -> web.Response:
    """A queue operation's answer: how many it changed, and the first AFFECTED_LISTED ids."""
    doc: dict[str, Any] = {"op": op, "count": len(ids), "affected": ids[:AFFECTED_LISTED]}
    if error:
        doc["error"] = error
    return web.json_response(doc, status=status)
