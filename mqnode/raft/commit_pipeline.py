"""CommitPipeline: group commit between asyncio callers and the Raft log.

Many SMTP sessions finish DATA at once; each awaits `submit(cmd)`. The
pipeline packs whatever is queued into one log entry (up to the cluster's
`EntrySizes.max_entry`, spool/commands.py) and keeps up to `max_inflight_entries` entries in flight,
so concurrent sessions share appends, fsyncs and LMDB transactions.

Limits and failure contract:
* at most `max_pending` submissions waiting or in flight; beyond that
  `BackpressureError` (451) at once — memory stays bounded;
* every submission resolves within `commit_timeout_s` or raises
  `CommitTimeoutError` (the entry may still commit: callers must make
  commands idempotent, which Enqueue is, by idempotency key and queue id);
* an entry holds its in-flight slot until Raft answers it or its own deadline
  (`commit_timeout_s` after it went out) passes, whichever comes first. The
  slot is ours to free: pysyncobj does not answer every command it takes (a
  forwarded command lost with its connection, a command overtaken by a
  snapshot install), and a slot that waited for that answer would be lost for
  good; after `max_inflight_entries` such losses nothing would commit again;
* `health()` tells whether a submission begun after the last commit has timed
  out, which /readyz reads: a node whose commits time out is not ready (one
  begun before a later commit is a straggler and does not count);
* idempotent commands are retried on "no leader"/"leader changed" until the
  deadline; others are retried only when the failure proves they were never
  appended;
* an Announce goes in an entry of its own (`ENTRY_OF_ITS_OWN`): a member of an
  older release that cannot decode it skips that entry alone, not the mail
  sharing it.

Dispatcher and ingress depend on the `Replicator` protocol, not on Raft.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mqnode.clock import Clock
from mqnode.errors import (
    BackpressureError,
    CommitTimeoutError,
    NoLeaderError,
    SubmitError,
    time_out,
)
from mqnode.raft import RaftNode
from mqnode.raft.settings import APPEND_BATCH_BYTES
from mqnode.spool.commands import (
    ANSWERED_ON_COMMIT,
    ENTRY_OF_ITS_OWN,
    SMALL_ENTRIES,
    Command,
    RecordOutcome,
    encode_command,
    encode_packed_entry,
)
from mqnode.spool.statemachine import Result

log = logging.getLogger(__name__)

# Failures that prove the command was never appended to any log.
_NOT_APPENDED = {"missing_leader", "not_leader", "queue_full"}
_RETRY_PAUSE_S = 0.05
# A command alone in an entry must stay under pysyncobj's batch size (settings.py); intake
# keeps bodies far below this, so only an envelope of tens of thousands of recipients nears it.
MAX_COMMAND_BYTES = APPEND_BATCH_BYTES - 64 * 1024


class Submitter(Protocol):
    """What SMTP ingress needs: the pipeline here, or the node over a worker's link."""

    async def submit(self, cmd: Command) -> Result: ...


class Replicator(Submitter, Protocol):
    def is_leader(self) -> bool: ...


@dataclass
class _Inflight:
    """One entry handed to Raft: its slot is freed once, by the answer or the deadline."""

    batch: list[_Item]
    timer: asyncio.TimerHandle | None = None
    ended: bool = False


@dataclass(frozen=True)
class PipelineHealth:
    """What /readyz needs to know of the commit path (monotonic seconds; None: never)."""

    last_commit_s: float | None  # when the last committed submission ended
    last_timeout_s: float | None  # when the last submission that timed out began
    expired_entries: int  # entries whose slot was freed by the deadline, not by Raft
    oldest_inflight_s: float | None  # age of the oldest entry still waiting for Raft

    @property
    def timing_out(self) -> bool:
        """A submission that began after the last commit ended has timed out."""
        if self.last_timeout_s is None:
            return False
        return self.last_commit_s is None or self.last_timeout_s > self.last_commit_s


@dataclass
class _Item:
    packed: list[bytes]  # the command encoded once, as the entry will hold it (pieces)
    size: int  # its bytes
    future: asyncio.Future[Result] = field(repr=False)
    early: bool  # may be answered before the state commit (ANSWERED_ON_COMMIT)
    alone: bool = False  # in an entry of its own (ENTRY_OF_ITS_OWN)


class CommitPipeline:
    def __init__(
        self,
        raft: RaftNode[Any],
        clock: Clock,
        max_pending: int,
        commit_timeout_s: float,
        max_inflight_entries: int = 16,
        entry_bytes: Callable[[], int] = lambda: SMALL_ENTRIES.max_entry,
    ) -> None:
        self._raft = raft
        # The cluster's entry size (formats.LevelGate.entry_sizes), read per entry packed.
        self._entry_bytes = entry_bytes
        self._clock = clock
        self._max_pending = max_pending
        self._timeout_s = commit_timeout_s
        self._max_inflight = max_inflight_entries
        self._queue: deque[_Item] = deque()
        self._pending = 0
        self._inflight: dict[int, tuple[float, _Inflight]] = {}  # id -> (sent at, entry)
        self._next_id = 0
        self._last_commit_s: float | None = None
        self._last_timeout_s: float | None = None
        self._expired = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_commit: Callable[[float], None] = lambda seconds: None  # metrics hook

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="commit-pipeline")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def is_leader(self) -> bool:
        return self._raft.status.role == "leader"

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def health(self) -> PipelineHealth:
        now = self._clock.monotonic_s()
        oldest = min((sent for sent, _ in self._inflight.values()), default=None)
        return PipelineHealth(
            self._last_commit_s,
            self._last_timeout_s,
            self._expired,
            None if oldest is None else now - oldest,
        )

    async def submit(self, cmd: Command) -> Result:
        packed = encode_command(cmd)
        size = sum(map(len, packed))
        if size >= MAX_COMMAND_BYTES:
            raise SubmitError(f"a command of {size} bytes is too big for a log entry")
        if self._pending >= self._max_pending:
            raise BackpressureError(f"too many commits pending ({self._pending})")
        self._pending += 1
        started = self._clock.monotonic_s()
        try:
            result = await self._submit_until(cmd, packed, size, started + self._timeout_s)
        except CommitTimeoutError:
            # When it began: one that began before the last commit ended says nothing new
            # (a straggler of a fault that has healed since).
            self._last_timeout_s = started
            raise
        else:
            self._last_commit_s = now = self._clock.monotonic_s()
            self.on_commit(now - started)
            return result
        finally:
            self._pending -= 1

    async def _submit_until(
        self, cmd: Command, packed: list[bytes], size: int, deadline: float
    ) -> Result:
        idempotent = not isinstance(cmd, RecordOutcome)
        early = isinstance(cmd, ANSWERED_ON_COMMIT)
        alone = isinstance(cmd, ENTRY_OF_ITS_OWN)
        loop = asyncio.get_running_loop()
        while True:
            item = _Item(packed, size, loop.create_future(), early, alone)
            self._queue.append(item)
            self._wake.set()
            remaining = deadline - self._clock.monotonic_s()
            # A timer that fails the future, not asyncio.wait_for (a wrapper future and
            # callbacks per submission: 4% of a leader's CPU under load).
            timer = loop.call_later(
                max(remaining, 0.001), time_out, item.future, "commit timed out"
            )
            try:
                return await item.future
            except NoLeaderError as exc:
                retry = idempotent or str(exc) in _NOT_APPENDED
                if not retry or self._clock.monotonic_s() + _RETRY_PAUSE_S >= deadline:
                    raise
            finally:
                timer.cancel()
            await asyncio.sleep(_RETRY_PAUSE_S)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and len(self._inflight) < self._max_inflight:
                self._send(self._take_batch())

    def _send(self, batch: list[_Item]) -> None:
        entry = _Inflight(batch)
        self._next_id += 1
        key = self._next_id
        self._inflight[key] = (self._clock.monotonic_s(), entry)
        # The deadline frees the slot whether or not Raft ever answers (module docstring).
        entry.timer = asyncio.get_running_loop().call_later(
            self._timeout_s, self._expire, key, entry
        )
        self._raft.submit_entry(
            encode_packed_entry([i.packed for i in batch]),
            lambda res, err: self._done(key, entry, res, err),
            early=all(i.early for i in batch),
        )

    def _end(self, key: int, entry: _Inflight) -> bool:
        """Free the entry's slot; False if it was freed before (an answer after the deadline)."""
        if entry.ended:
            return False
        entry.ended = True
        if entry.timer is not None:
            entry.timer.cancel()
        del self._inflight[key]
        self._wake.set()
        return True

    def _expire(self, key: int, entry: _Inflight) -> None:
        if not self._end(key, entry):
            return
        self._expired += 1
        log.warning(
            "commit pipeline: an entry of %d submission(s) got no answer from Raft in "
            "%.1f s; its slot is free again (the entry may still commit)",
            len(entry.batch),
            self._timeout_s,
        )
        for item in entry.batch:
            time_out(item.future, "commit timed out")

    def _take_batch(self) -> list[_Item]:
        batch = [self._queue.popleft()]
        if batch[0].alone:
            return batch
        total = batch[0].size + 16
        limit = self._entry_bytes()
        while self._queue and not self._queue[0].alone and total + self._queue[0].size < limit:
            item = self._queue.popleft()
            total += item.size
            batch.append(item)
        return batch

    def _done(
        self, key: int, entry: _Inflight, results: list[Result] | None, err: str | None
    ) -> None:
        self._end(key, entry)
        for i, item in enumerate(entry.batch):
            if item.future.done():
                continue
            if err is not None:
                item.future.set_exception(NoLeaderError(err))
            elif results is None or i >= len(results):
                item.future.set_exception(SubmitError("entry was applied before (replay)"))
            else:
                item.future.set_result(results[i])
