"""The admin endpoint's traffic shaping routes (token needed).

    GET  /shaping            the rules as applied (text, time), as parsed, and this node's
                             site states when it holds the lease (rate now, suspensions)
    POST /shaping {"text"}   check the TOML rules (400 naming the rule) and commit them:
                             every lease holder from then on enforces them

Writes are refused with 503 while a member runs a release that cannot read
them (raft/formats.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from mqnode.admin.json_body import json_body
from mqnode.clock import Clock
from mqnode.errors import ConfigError, SubmitError
from mqnode.raft.commit_pipeline import Replicator
from mqnode.spool.commands import SetShaping
from mqnode.spool.shaping_rules import MAX_RULES_BYTES, ShapingRules
from mqnode.spool.store import QueueStore


class ShapingRoutes:
    def __init__(
        self,
        store: QueueStore,
        replicator: Replicator,
        clock: Clock,
        writable: Callable[[], bool],
        sites: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._store = store
        self._rep = replicator
        self._clock = clock
        self._writable = writable
        self._sites = sites

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/shaping", self._show), web.post("/shaping", self._apply)]

    async def _show(self, request: web.Request) -> web.Response:
        applied = self._store.shaping()
        text = str(applied.get("text", ""))
        try:
            rules = ShapingRules.parse(text).describe() if text else []
        except ConfigError as exc:
            rules = [{"error": str(exc)}]
        return web.json_response(
            {
                "text": text,
                "applied_ms": int(applied.get("at_ms", 0)),
                "rules": rules,
                "sites": self._sites(),
            }
        )

    async def _apply(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
            text = body.get("text") if isinstance(body, dict) else None
            if not isinstance(text, str) or len(text.encode()) > MAX_RULES_BYTES:
                raise ValueError(
                    f'body must be {{"text": TOML}} of at most {MAX_RULES_BYTES} bytes'
                )
            rules = ShapingRules.parse(text)
        except (ValueError, ConfigError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not self._writable():
            return web.json_response(
                {"error": "a member runs a release without traffic shaping; upgrade it"},
                status=503,
            )
        try:
            status, detail = await self._rep.submit(SetShaping(text, self._clock.wall_ms()))
        except SubmitError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        if status != "ok":
            return web.json_response({"error": detail}, status=400)
        return web.json_response({"applied": True, "sites": [s.name for s in rules.sites]})
