"""Admin HTTP endpoint (aiohttp) on `admin_addr`: status and queue inspection.

    GET  /status           node, Raft and queue summary (what `mqnode status` prints)
    GET  /queue            ?state=active|deferred|hold&limit=N (default 1000, max 100000)
    GET  /queue/{id}       one message: envelope, per-recipient status, attempts
    GET  /queue/{id}/body  the stored message as it will be sent (like postcat)
    POST /raft/compact     ask for a log compaction (snapshot) now
    POST /fault/partition  {"block": ["host:port", ...]}: drop Raft traffic with
                           those peers (only with `fault_injection = 1`; tests)

Binds to loopback by default. Reads only; queue writes arrive with the
queue-control issue and will go through the log like everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from .model import MessageState
from .raft import RaftNode
from .store import QueueStore

MAX_LIST = 100_000


class AdminServer:
    def __init__(
        self,
        node_info: dict[str, str],
        store: QueueStore,
        raft: RaftNode,
        lease_held: Callable[[], bool],
        fault_injection: bool = False,
    ) -> None:
        self._info = node_info
        self._store = store
        self._raft = raft
        self._lease_held = lease_held
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/status", self._status),
                web.get("/queue", self._list),
                web.get("/queue/{id}", self._show),
                web.get("/queue/{id}/body", self._body),
                web.post("/raft/compact", self._compact),
            ]
        )
        if fault_injection:
            self.app.add_routes([web.post("/fault/partition", self._partition)])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def status(self) -> dict[str, Any]:
        st = self._raft.status
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
            "queue": self._store.counts(),
            "lease_held": self._lease_held(),
        }

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _list(self, request: web.Request) -> web.Response:
        state_s = request.query.get("state")
        try:
            state = MessageState(state_s) if state_s else None
            limit = min(int(request.query.get("limit", "1000")), MAX_LIST)
        except ValueError:
            return web.json_response({"error": "bad state or limit"}, status=400)
        msgs = self._store.list_messages(limit, state)
        return web.json_response({"messages": [m.summary() for m in msgs]})

    async def _show(self, request: web.Request) -> web.Response:
        msg = self._store.get_message(request.match_info["id"])
        if msg is None:
            return web.json_response({"error": "no such message"}, status=404)
        return web.json_response(msg.summary())

    async def _body(self, request: web.Request) -> web.Response:
        msg = self._store.get_message(request.match_info["id"])
        if msg is None:
            return web.json_response({"error": "no such message"}, status=404)
        body = self._store.read_body(msg)
        return web.Response(body=body, content_type="message/rfc822")

    async def _compact(self, request: web.Request) -> web.Response:
        self._raft.force_compaction()
        self._raft.wake()
        return web.json_response({"ok": True})

    async def _partition(self, request: web.Request) -> web.Response:
        body = await request.json()
        blocked = body.get("block", [])
        if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
            return web.json_response({"error": "block must be a list of host:port"}, status=400)
        self._raft.set_partition(blocked)
        return web.json_response({"blocked": blocked})
