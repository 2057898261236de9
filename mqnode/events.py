"""EventLog: one JSON line per queue event, keyed by queue id (Postfix's queue-id log lines).

    {"ts_ms": ..., "node": "n1", "event": "committed", "queue_id": "06H...", ...}

Events: received (end of DATA, before submit), committed (the 250), claimed
(by the lease holder, with its epoch), delivered / deferred / bounced (one per
recipient, with the remote host and reply), expired (bounced at the end of
the queue lifetime). Written with `event_log = PATH` (append, one line per
write, flushed), or `-` for stderr; nothing when unset. A write failure is
logged once and never stops mail.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any

from .clock import Clock

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, path: str, node_id: str, clock: Clock) -> None:
        self._node = node_id
        self._clock = clock
        self._out: IO[str] | None = None
        self._owned = False
        self._failed = False
        if path == "-":
            self._out = sys.stderr
        elif path:
            self._out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._owned = True

    def emit(self, event: str, queue_id: str, **fields: Any) -> None:
        if self._out is None:
            return
        record = {
            "ts_ms": self._clock.wall_ms(),
            "node": self._node,
            "event": event,
            "queue_id": queue_id,
            **fields,
        }
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
