"""The audit trail: every administrative write, committed through the log before it runs.

A middleware after the role check (access/policy.py) commits an Audit command
(spool/commands.py) for every POST of the admin endpoint (but submissions and
the tests' `/fault/*`, which only `fault_injection = true` serves): the principal, the
action (the route, e.g. `queue/delete`, `suppressions/add`, `raft/add-node`),
its target (the request's JSON, cut at MAX_TARGET_CHARS) and the time, taken
before submit. A node-local write (compaction, reloads, a leadership transfer)
runs only once its record is committed, and is refused with 503 if it cannot
be. A write that is itself a command in the log (queue operations, suppression,
shaping, membership) waits for its record up to HEAD_START_S, then goes
anyway: it is submitted behind its record and commits only with a majority,
as the record does (so a membership change can still be refused as "another
change pending" while the cluster has no majority). The
node's own writes with no request (a principals reload on SIGHUP) are recorded
the same way with the principal `signal`.

Records are kept `audit_keep_days` (400 by default): each Audit applied drops up
to 16 older than that before its own time, as the rest of the state's expiry.
Any node lists them (`GET /audit?since_ms=&principal=&limit=`, `mqnode audit`);
each is also an `audit` event (event log and webhook) on the node that took the
request.

`mqnode restore` leaves its record in the data dir (restore.py PENDING_AUDIT);
the node commits it once it leads, and then removes the file.

While a member runs a version that cannot read Audit (a rolling upgrade; the
cluster's reads level below AUDIT_LEVEL), records go to this node's log only.
So do those made before every member has announced what it reads (the
first second of a new cluster, or a member that never started): refusing
them would also refuse the `raft/remove-node` that removes such a member.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from mqnode.access.policy import Handler, principal_of
from mqnode.clock import Clock
from mqnode.errors import SubmitError
from mqnode.events import EventLog
from mqnode.raft.commit_pipeline import Submitter
from mqnode.spool.commands import Audit
from mqnode.spool.store import QueueStore

log = logging.getLogger(__name__)

MAX_TARGET_CHARS = 2000
MAX_NAME_CHARS = 200  # a principal's name or an action (spool/statemachine.py checks)
MAX_LIST = 10_000
# Actions that are themselves commands in the log: they may go ahead of a record that has
# not committed within HEAD_START_S (see the middleware).
LOGGED = ("queue/", "suppressions/", "shaping", "raft/add-node", "raft/remove-node")
HEAD_START_S = 0.5
DAY_MS = 86_400_000


class Auditor:
    def __init__(
        self,
        submitter: Submitter,
        clock: Clock,
        node_id: str,
        keep_days: int,
        readiness: Callable[[], str],
    ) -> None:
        self._rep = submitter
        self._clock = clock
        self._node_id = node_id
        self._keep_ms = keep_days * DAY_MS
        # "ready": every member reads Audit; "older": one runs a release that cannot;
        # "unknown": a member has not announced what it reads yet (just started)
        self._readiness = readiness
        self.events: EventLog | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("audit record not committed: %s", exc)

    async def record(
        self, principal: str, action: str, target: str, at_ms: int | None = None
    ) -> None:
        """Commit the record; SubmitError if it was not committed (refuse the write).
        `at_ms`: when it happened, if not now (a restore, recorded at the next start)."""
        at_ms = self._clock.wall_ms() if at_ms is None else at_ms
        # Lone surrogates (a JSON "\ud800") cannot be encoded: replaced, never a 500.
        principal, action, target = (
            _text(principal, MAX_NAME_CHARS),
            _text(action, MAX_NAME_CHARS),
            _text(target, MAX_TARGET_CHARS),
        )
        if self.events is not None:
            self.events.emit("audit", "", principal=principal, action=action, target=target)
        if self._readiness() != "ready":
            log.warning(
                "audit (not replicated: a member cannot read it, or has not said yet): %s %s %s",
                principal,
                action,
                target,
            )
            return
        cmd = Audit(at_ms, principal, action, target, self._node_id, self._keep_ms)
        status, value = await self._rep.submit(cmd)
        if status != "ok":
            raise SubmitError(f"audit record not committed: {value}")

    async def commit_pending(self, path: Path, retry_s: float = 1.0) -> None:
        """Commit the record a restore left at `path`, retrying until it is committed (or
        the node stops), then remove the file."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            args = (str(doc["principal"]), str(doc["action"]), str(doc["target"]))
            at_ms = int(doc["at_ms"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("audit: cannot read %s (%s); removing it", path, exc)
            path.unlink(missing_ok=True)
            return
        while True:
            if self._readiness() == "unknown":  # wait for the announcements
                await asyncio.sleep(retry_s)
                continue
            try:
                await self.record(*args, at_ms=at_ms)
                break
            except SubmitError as exc:
                log.info("audit: the restore's record is not committed yet: %s", exc)
                await asyncio.sleep(retry_s)
        path.unlink(missing_ok=True)

    def middleware(self) -> Any:
        @web.middleware
        async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
            if (
                request.method != "POST"
                or request.match_info.route.resource is None
                or request.path.startswith("/v1/")  # submissions: events, not the audit trail
                or request.path.startswith("/fault/")  # tests' fault injection (config)
            ):
                return await handler(request)
            action = _action(request)
            task = asyncio.create_task(
                self.record(principal_of(request), action, await _target(request))
            )
            self._tasks.add(task)
            task.add_done_callback(self._ended)
            # A write through the log waits HEAD_START_S at most: after that (no majority
            # now) it is tried anyway, queued behind its record, and commits only with the
            # majority the record needs too (a membership change must still be tried
            # while another is pending, to be refused as such). Any other waits in full.
            head_start = HEAD_START_S if action.startswith(LOGGED) else None
            done, _ = await asyncio.wait({task}, timeout=head_start)
            if task in done and (exc := task.exception()) is not None:
                return web.json_response(
                    {"error": f"not done: the audit record: {exc}; try again"},
                    status=503,
                    headers={"Retry-After": "1"},
                )
            return await handler(request)

        return audit

    def routes(self, store: QueueStore) -> list[web.RouteDef]:
        async def listing(request: web.Request) -> web.Response:
            q = request.query
            try:
                since = int(q.get("since_ms", "0"))
                limit = min(MAX_LIST, max(1, int(q.get("limit", "1000"))))
            except ValueError:
                return web.json_response({"error": "since_ms and limit are numbers"}, status=400)
            records = store.audit_records(since, q.get("principal", ""), limit)
            return web.json_response({"records": records})

        return [web.get("/audit", listing)]


def _text(value: str, limit: int) -> str:
    return value[:limit].encode("utf-8", "replace").decode("utf-8")


def _action(request: web.Request) -> str:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    op = request.match_info.get("op")
    path = canonical.replace("{op}", op) if op else canonical
    return path.strip("/")


async def _target(request: web.Request) -> str:
    """The request's JSON, compact (the handler reads the same cached bytes)."""
    raw = await request.read()
    if not raw:
        return ""
    try:
        return json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return raw[:MAX_TARGET_CHARS].decode("utf-8", "replace")
