"""Every command pysyncobj takes gets an answer: the ones it would never answer are failed here.

pysyncobj answers a submitted command through a callback, and in three cases
it never calls it (0.3.17):

* A follower forwards a command to the leader and waits for the leader's
  `apply_command_response` in `__commandsWaitingReply`, which it clears only
  when it hears of a *different* leader. A command or its answer lost with a
  closed connection (a partition, a link reset) waits there for good while
  the same leader stays on.
* The leader (or a follower that learned the index) waits for the entry to
  apply in `__commandsWaitingCommit`, popped only by applying that index. A
  snapshot install jumps the applied index past it, and nobody pops it.
* Nothing bounds either map: unanswered callbacks would pile up.

Callers of ours (the commit pipeline) free what they hold at their own
deadline whatever happens here; this module frees pysyncobj's side and gives
the caller a prompt, truthful answer: `unknown_outcome` (the command may or
may not have been appended; only an idempotent command may be sent again).

When: a forwarded command is failed as soon as the connection to the leader
closes, and by age (`FORWARD_ANSWER_MAX_S`) when it stays open; entries at or
below the applied index are failed at the next sweep. Runs on the tick thread
only (pysyncobj is not thread-safe); a sweep costs a dict scan, at most once
per `SWEEP_EVERY_S`.
"""

from __future__ import annotations

import logging
from typing import Any

from pysyncobj import FAIL_REASON

from mqnode.raft.internals import SyncInternals

log = logging.getLogger("mqnode.raft")

SWEEP_EVERY_S = 0.5
# A forwarded command's answer normally comes within one round trip; a commit times out
# for our callers after commit_timeout_ms (10 s by default) anyway.
FORWARD_ANSWER_MAX_S = 15.0
UNKNOWN = FAIL_REASON.UNKNOWN_OUTCOME


class UnansweredCommands:
    """Fails the callbacks pysyncobj holds but will never call (module docstring)."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync
        self._raw = SyncInternals(sync)
        self._next_sweep = 0.0
        self._first_seen: dict[int, float] = {}  # forwarded request id -> when first seen
        self.failed_total = 0  # callbacks failed here, for /status

    def _waiting_reply(self) -> dict[int, Any]:
        return self._raw.commands_waiting_reply

    def _waiting_commit(self) -> dict[int, list[tuple[int, Any]]]:
        return self._raw.commands_waiting_commit

    def fail_forwarded(self, why: str) -> int:
        """The connection to the leader closed: no answer can come for what we forwarded."""
        waiting = self._waiting_reply()
        if not waiting:
            return 0
        callbacks = [waiting.pop(rid) for rid in sorted(waiting)]
        self._first_seen.clear()
        self._call(callbacks, why)
        return len(callbacks)

    def sweep(self, now: float) -> int:
        """Fail what waits past an applied index or too long for a forwarded answer."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + SWEEP_EVERY_S
        callbacks: list[Any] = []
        waiting_commit = self._waiting_commit()
        if waiting_commit:
            applied = int(self._sync.raftLastApplied)
            for idx in [i for i in waiting_commit if i <= applied]:
                callbacks.extend(cb for _, cb in waiting_commit.pop(idx))
        waiting = self._waiting_reply()
        seen = self._first_seen
        for rid in [r for r in seen if r not in waiting]:
            del seen[rid]  # answered
        for rid in waiting:
            seen.setdefault(rid, now)
        for rid in sorted(r for r, at in seen.items() if now - at > FORWARD_ANSWER_MAX_S):
            callbacks.append(waiting.pop(rid))
            del seen[rid]
        if callbacks:
            self._call(callbacks, "no answer from pysyncobj (overtaken by a snapshot or lost)")
        return len(callbacks)

    def _call(self, callbacks: list[Any], why: str) -> None:
        self.failed_total += len(callbacks)
        log.info(
            "raft: %d command(s) will get no answer (%s): failed as unknown", len(callbacks), why
        )
        for callback in callbacks:
            if callback is None or isinstance(callback, tuple):
                continue  # a peer's forwarded request (leader side): its sender times out
            try:
                callback(None, UNKNOWN)
            except Exception:  # one caller's failure must not cost the tick
                log.exception("raft: failing an unanswered command's callback")
