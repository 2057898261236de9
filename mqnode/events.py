"""EventLog: one JSON line per queue event, keyed by queue id (Postfix's queue-id log lines).

    {"ts_ms": ..., "node": "n1", "event": "committed", "queue_id": "06H...", ...}

Events: received (end of DATA, before submit), committed (the 250), claimed
(by the lease holder, with its epoch), delivered / deferred / bounced (one per
recipient, with the remote host and reply), expired (bounced at the end of
the queue lifetime), bounce-queued (a delivery status report with a failure
in it was queued for the sender, with its queue id) or success-report-queued
(one of successes only: RFC 3461 NOTIFY=SUCCESS). Written with
`event_log = PATH` (append, one line per write, flushed), or `-` for
stderr; nothing when unset. A write failure is logged once and never stops
mail.

Webhook (`event_webhook = URL`): events are also POSTed as a JSON array, in
batches of up to `WEBHOOK_BATCH`, retried with backoff (1 s doubling to 60 s)
until the endpoint answers 2xx. At most `WEBHOOK_QUEUE` events wait; beyond
that the oldest are dropped and counted (`dropped`): the webhook is a feed,
not a second queue of record (the log and the Raft state are).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections import deque
from typing import IO, Any

import aiohttp

from mqnode.clock import Clock

log = logging.getLogger(__name__)

WEBHOOK_QUEUE = 10_000
WEBHOOK_BATCH = 100


class EventLog:
    def __init__(self, path: str, node_id: str, clock: Clock, webhook_url: str = "") -> None:
        self._node = node_id
        self._webhook_url = webhook_url
        self._pending: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        self.posted = 0
        self._clock = clock
        self._out: IO[str] | None = None
        self._owned = False
        self._failed = False
        if path == "-":
            self._out = sys.stderr
        elif path:
            self._out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._owned = True

    @property
    def active(self) -> bool:
        """Whether events go anywhere: callers skip work spent only on an event's fields."""
        return self._out is not None or bool(self._webhook_url)

    def emit(self, event: str, queue_id: str, **fields: Any) -> None:
        if not self.active:
            return
        record = {
            "ts_ms": self._clock.wall_ms(),
            "node": self._node,
            "event": event,
            "queue_id": queue_id,
            **fields,
        }
        if self._webhook_url:
            if len(self._pending) >= WEBHOOK_QUEUE:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(record)
            self._wake.set()
        if self._out is None:
            return
        try:
            self._out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self._out.flush()
        except OSError as exc:
            if not self._failed:
                log.error("event log write failed (further failures are silent): %s", exc)
                self._failed = True

    def close(self) -> None:
        if self._owned and self._out is not None:
            self._out.close()
        self._out = None

    async def run_webhook(self) -> None:
        """POST pending events to the webhook until cancelled (a task of the node)."""
        if not self._webhook_url:
            return
        delay_s = 1.0
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                batch = [self._pending[i] for i in range(min(WEBHOOK_BATCH, len(self._pending)))]
                try:
                    async with session.post(self._webhook_url, json=batch) as resp:
                        ok = 200 <= resp.status < 300
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("event webhook: %s", exc)
                    ok = False
                if ok:
                    for _ in batch:
                        if self._pending:
                            self._pending.popleft()
                    self.posted += len(batch)
                    delay_s = 1.0
                else:
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 60.0)
