"""The admin endpoint's suppression list routes (token needed; any node answers reads).

    GET  /suppressions?limit=N&after=KEY&scope=D&source=S   entries in key order
    GET  /suppressions/entry?target=T&scope=D              one entry (404 if none)
    GET  /suppressions/check?rcpt=R&sender=S               would mail from S to R be refused?
    POST /suppressions/add     {"entries": [{"target", "scope", "reason", "expires_ms",
                                             "source": "manual" | "import"}, ...]}
    POST /suppressions/remove  {"entries": [{"target", "scope"}, ...]}

Writes go through the log (a `Suppress` command per ENTRIES_PER_COMMAND
entries), so every node answers the same afterwards; a write is refused with
503 while a member runs a release that cannot read them, and with 400 naming
the entry when one is not an address or a domain (nothing of that request is
written then). A list page reads at most `SUPPRESSION_SCAN` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from mqnode.admin.json_body import json_body
from mqnode.clock import Clock
from mqnode.errors import SubmitError
from mqnode.raft.commit_pipeline import Replicator
from mqnode.spool.commands import Suppress
from mqnode.spool.store import QueueStore
from mqnode.spool.suppression import (
    ENTRIES_PER_COMMAND,
    SOURCES,
    Entry,
    SuppressionError,
    make_entry,
    normalise_scope,
    normalise_target,
)

MAX_ENTRIES_PER_REQUEST = 10_000  # and the body is at most 1 MiB (aiohttp's default)
MAX_PAGE = 10_000


class SuppressionRoutes:
    def __init__(
        self,
        store: QueueStore,
        replicator: Replicator,
        clock: Clock,
        writable: Callable[[], bool],
    ) -> None:
        self._store = store
        self._rep = replicator
        self._clock = clock
        self._writable = writable

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/suppressions", self._list),
            web.get("/suppressions/entry", self._entry),
            web.get("/suppressions/check", self._check),
            web.post("/suppressions/add", self._add),
            web.post("/suppressions/remove", self._remove),
        ]

    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = min(max(int(q.get("limit", "100")), 1), MAX_PAGE)
            scope = normalise_scope(q["scope"]) if "scope" in q else None
        except (ValueError, SuppressionError) as exc:
            return _bad(str(exc))
        source = q.get("source", "")
        if source and source not in SOURCES:
            return _bad(f"source must be one of {', '.join(SOURCES)}")
        with self._store.reader() as r:
            entries = r.list_suppressions(limit + 1, q.get("after", ""), scope, source)
        more = len(entries) > limit
        entries = entries[:limit]
        page: dict[str, Any] = {
            "entries": [e.view() for e in entries],
            "total": self._store.suppression_count(),
        }
        if more:
            page["next"] = f"{entries[-1].scope}\0{entries[-1].target}"
        return web.json_response(page)

    async def _entry(self, request: web.Request) -> web.Response:
        try:
            target = normalise_target(request.query.get("target", ""))
            scope = normalise_scope(request.query.get("scope", ""))
        except SuppressionError as exc:
            return _bad(str(exc))
        with self._store.reader() as r:
            found = r.get_suppression(f"{scope}\0{target}".encode())
        if found is None:
            return web.json_response({"error": "not on the suppression list"}, status=404)
        return web.json_response(found.view())

    async def _check(self, request: web.Request) -> web.Response:
        rcpt, sender = request.query.get("rcpt", ""), request.query.get("sender", "")
        entry = self._store.suppressed(rcpt, sender.rpartition("@")[2], self._clock.wall_ms())
        return web.json_response(
            {"suppressed": entry is not None, **({"entry": entry.view()} if entry else {})}
        )

    async def _add(self, request: web.Request) -> web.Response:
        now = self._clock.wall_ms()

        def build(item: dict[str, Any]) -> Entry:
            source = str(item.get("source", "manual"))
            if source not in ("manual", "import"):
                raise SuppressionError("source must be manual or import")
            return make_entry(
                str(item.get("target", "")),
                str(item.get("scope", "")),
                str(item.get("reason", "")),
                source,
                int(item.get("created_ms", now)),
                int(item.get("expires_ms", 0)),
            )

        return await self._write(request, "add", build)

    async def _remove(self, request: web.Request) -> web.Response:
        def build(item: dict[str, Any]) -> Entry:
            return make_entry(str(item.get("target", "")), str(item.get("scope", "")))

        return await self._write(request, "remove", build)

    async def _write(
        self, request: web.Request, op: str, build: Callable[[dict[str, Any]], Entry]
    ) -> web.Response:
        try:
            body = await json_body(request)
            items = body.get("entries") if isinstance(body, dict) else None
            if not isinstance(items, list) or len(items) > MAX_ENTRIES_PER_REQUEST:
                raise ValueError(
                    f"body must be {{'entries': [...]}}, at most {MAX_ENTRIES_PER_REQUEST}"
                )
            entries = []
            for n, item in enumerate(items, 1):
                if not isinstance(item, dict):
                    raise ValueError(f"entry {n}: not an object")
                try:
                    entries.append(build(item))
                except (SuppressionError, TypeError, ValueError) as exc:
                    raise ValueError(f"entry {n}: {exc}") from None
        except ValueError as exc:
            return _bad(str(exc))
        if not self._writable():
            return web.json_response(
                {"error": "a member runs a release without the suppression list; upgrade it"},
                status=503,
            )
        changed = 0
        try:
            for start in range(0, len(entries), ENTRIES_PER_COMMAND):
                part = entries[start : start + ENTRIES_PER_COMMAND]
                cmd = Suppress(op, tuple(e.as_command_item() for e in part), self._clock.wall_ms())
                status, detail = await self._rep.submit(cmd)
                if status != "ok":
                    return web.json_response({"error": detail, "changed": changed}, status=400)
                changed += int(detail or 0)
        except SubmitError as exc:
            return web.json_response({"error": str(exc), "changed": changed}, status=503)
        return web.json_response({"op": op, "entries": len(entries), "changed": changed})


def _bad(text: str) -> web.Response:
    return web.json_response({"error": text}, status=400)
