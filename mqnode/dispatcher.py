"""Dispatcher: the leader's claim -> deliver -> record loop.

Scope today: relay-host delivery only, dispatched while this node is the Raft
leader. Each attempt's per-recipient outcome is committed through the log
(RecordOutcome), so every node agrees on what was delivered, deferred or
bounced, and a completed message is deleted everywhere.

Limits: `concurrency` deliveries in flight, `batch` messages per scan, one
scan every `scan_interval_s` (sooner when woken by new mail).

Not yet fenced by a lease (see the delivery issue): a deposed leader can
still finish deliveries it had started, so a failover may duplicate the
messages in flight at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .clock import Clock
from .commands import RecordOutcome
from .delivery import DeliveryAgent
from .errors import MqnodeError
from .model import QueuedMessage, RcptState
from .policy import RetryPolicy
from .replicator import Replicator
from .store import QueueStore

log = logging.getLogger(__name__)

MAX_REPLY_CHARS = 256
RESULTS_PER_COMMAND = 100


class Dispatcher:
    def __init__(
        self,
        store: QueueStore,
        replicator: Replicator,
        agent: DeliveryAgent,
        clock: Clock,
        policy: RetryPolicy,
        unit_random: Callable[[], float],
        relay: tuple[str, int] | None,
        concurrency: int,
        batch: int = 100,
        scan_interval_s: float = 0.5,
    ) -> None:
        self._store = store
        self._rep = replicator
        self._agent = agent
        self._clock = clock
        self._policy = policy
        self._random = unit_random
        self._relay = relay
        self._sem = asyncio.Semaphore(concurrency)
        self._batch = batch
        self._interval_s = scan_interval_s
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.delivered = 0
        self.deferred = 0
        self.bounced = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._relay is None or not self._rep.is_leader():
                continue
            for msg in self._store.due_messages(self._clock.wall_ms(), self._batch):
                if msg.queue_id in self._in_flight:
                    continue
                await self._sem.acquire()
                self._in_flight.add(msg.queue_id)
                task = asyncio.create_task(self._attempt(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _attempt(self, msg: QueuedMessage) -> None:
        try:
            await self._deliver(msg)
        except MqnodeError as exc:
            log.warning("%s: attempt not recorded: %s", msg.queue_id, exc)
        except Exception:
            log.exception("%s: delivery attempt crashed", msg.queue_id)
        finally:
            self._in_flight.discard(msg.queue_id)
            self._sem.release()

    async def _deliver(self, msg: QueuedMessage) -> None:
        assert self._relay is not None
        pending = [
            (i, r.address) for i, r in enumerate(msg.recipients) if r.state is RcptState.PENDING
        ]
        if not pending:
            return
        body = self._store.read_body(msg)
        host, port = self._relay
        results = await self._agent.deliver(host, port, msg.mail_from, pending, body)
        now_ms = self._clock.wall_ms()
        delay_s = self._policy.delay_s(msg.attempts + 1, self._random)
        results = [(i, out, reply[:MAX_REPLY_CHARS]) for i, out, reply in results]
        next_ms = now_ms + int(delay_s * 1000)
        for start in range(0, len(results), RESULTS_PER_COMMAND):  # keep entries small
            part = tuple(results[start : start + RESULTS_PER_COMMAND])
            await self._rep.submit(RecordOutcome(msg.queue_id, now_ms, part, next_ms))
        for _, outcome, reply in results:
            setattr(self, outcome, getattr(self, outcome) + 1)
            log.info("%s: %s via %s:%d: %s", msg.queue_id, outcome, host, port, reply)
