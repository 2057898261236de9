"""WorkerPool: the node's SMTP worker processes (`smtp_workers` > 0) and their requests.

The node binds the SMTP listening sockets and starts `smtp_workers`
processes of `mqnode.smtp.worker_process` that accept on them; the node then runs no
SMTP session itself, and its interpreter is left to Raft, the commit pipeline
and delivery. It answers each worker's link (smtp/worker_link.py):
* SUBMIT through the commit pipeline, so sessions of all workers share log
  entries and fsyncs, with the `received`/`committed` events and the
  dispatcher's wake-up the in-process ingress gives;
* OPEN, CLOSE and MESSAGE from the node's one ClientLimits (limits are per
  node, not per worker); a dead worker's open connections are given back;
* the store's fill ratio every `FILL_PUSH_S`.

Supervision: a worker that dies (its link reaches end of file) is reaped and
started again after `RESTART_MIN_S`, doubling up to `RESTART_MAX_S` while it
keeps dying within `STABLE_S` of its start. Its clients lose their
connections without a 250, so they retry; nothing acknowledged depends on a
worker. Stop: SIGTERM to each worker by PID (they stop accepting and drain),
SIGKILL after `STOP_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mqnode
from mqnode.clock import Clock
from mqnode.compression import inflate_head
from mqnode.config import NodeConfig
from mqnode.errors import CodecError, MqnodeError, SubmitError
from mqnode.events import EventLog
from mqnode.intake import emit_committed, emit_received
from mqnode.raft.commit_pipeline import Submitter
from mqnode.signing.keys import HEADER_SCAN_BYTES, signing_domains
from mqnode.smtp.front import bind, listen_addrs
from mqnode.smtp.ratelimit import ClientLimits
from mqnode.smtp.worker_link import (
    ALLOWED,
    CLOSE,
    COUNTS,
    DKIM,
    FAILED,
    FILL,
    MESSAGE,
    OPEN,
    OPENED,
    RESULT,
    SUBMIT,
    SUPPRESSED,
    UP,
    VERDICT,
    Link,
    error_kind,
)
from mqnode.smtp.worker_process import DRAIN_S
from mqnode.spool.commands import DEFLATE, Enqueue, from_wire

log = logging.getLogger(__name__)

FILL_PUSH_S = 0.5
MAX_DKIM_DOMAINS = 10_000  # signing domains a worker may report (bounds its message)
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
STABLE_S = 30.0
STOP_WAIT_S = DRAIN_S + 2.0
BIND_WAIT_S = 5.0  # a killed node's workers may hold the port for a moment


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    link: Link | None = None
    keys: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    counts: tuple[int, int] = (0, 0)
    dkim: tuple[dict[str, int], int] = ({}, 0)  # what its ingress signed, failures
    suppressed: int = 0  # recipients refused at RCPT because they are suppressed
    up: bool = False  # accepting SMTP connections (it said UP; false again once it exits)


class WorkerPool:
    def __init__(
        self,
        cfg: NodeConfig,
        submitter: Submitter,
        limits: ClientLimits,
        fill_ratio: Callable[[], float],
        clock: Clock,
    ) -> None:
        self._cfg = cfg
        self._submitter = submitter
        self._limits = limits
        self._fill_ratio = fill_ratio
        self._clock = clock
        self._workers = [_Worker(i) for i in range(cfg.smtp_workers)]
        self._socks: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._submits: set[asyncio.Task[None]] = set()
        self._retired = (0, 0)
        self._retired_dkim: tuple[dict[str, int], int] = ({}, 0)
        self._retired_suppressed = 0
        self._stopping = False
        self.restarts = 0
        self.events: EventLog | None = None
        # The suppression list (Node._suppression): why a recipient is suppressed, and how
        # many entries there are (pushed with the fill ratio: none, no question asked).
        self.suppression: Callable[[str, str], str | None] = lambda rcpt, sender: None
        # The cluster's reads level (formats.LevelGate.level): the workers split bodies by it.
        self.level: Callable[[], int] = lambda: 1
        self.suppression_count: Callable[[], int] = lambda: 0

    def set_suppression(
        self, reason: Callable[[str, str], str | None], count: Callable[[], int]
    ) -> None:
        """Answer the workers' RCPT questions with `reason`; `count` goes with the fill."""
        self.suppression, self.suppression_count = reason, count

    # --- what the node reads ------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(accepted, refused) by every worker so far, those that died included."""
        accepted, refused = self._retired
        for w in self._workers:
            accepted += w.counts[0]
            refused += w.counts[1]
        return accepted, refused

    def dkim_counts(self) -> tuple[dict[str, int], int]:
        """(messages signed by domain, signing failures) by every worker so far."""
        signed, failed = dict(self._retired_dkim[0]), self._retired_dkim[1]
        for w in self._workers:
            for domain, n in w.dkim[0].items():
                signed[domain] = signed.get(domain, 0) + n
            failed += w.dkim[1]
        return signed, failed

    def suppressed_refused(self) -> int:
        """Recipients refused at RCPT TO as suppressed, by every worker so far."""
        return self._retired_suppressed + sum(w.suppressed for w in self._workers)

    def set_dkim(self, settings: dict[str, Any]) -> None:
        """Each worker signs with these dkim_* settings from now on, and so does every
        worker started later. A worker that cannot load them keeps its keys and logs why."""
        self._cfg = dataclasses.replace(self._cfg, **settings)
        for w in self._workers:
            if w.link is not None and not w.link.closed:
                w.link.send([DKIM, settings])

    def describe(self) -> dict[str, Any]:
        """For /status: the workers running now (by PID), how many of them accept
        connections, and how often one was restarted."""
        running = [w.proc.pid for w in self._workers if w.proc and w.proc.poll() is None]
        return {
            "configured": len(self._workers),
            "pids": running,
            "up": self.up()[0],
            "restarts": self.restarts,
        }

    def up(self) -> tuple[int, int]:
        """(workers accepting connections, workers configured). A worker is up from its
        UP, sent once its sockets accept, until it exits; before, connections wait in
        the listening socket's backlog (~0.5 s of imports after a start)."""
        return sum(1 for w in self._workers if w.up), len(self._workers)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._socks = await self._bind_all()
        loop = asyncio.get_running_loop()
        for w in self._workers:
            self._tasks.append(loop.create_task(self._supervise(w), name=f"smtp-worker-{w.index}"))
        self._tasks.append(loop.create_task(self._push_fill(), name="smtp-worker-fill"))

    async def stop(self) -> None:
        self._stopping = True
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        supervisors = self._tasks[: len(self._workers)]
        if supervisors:
            await asyncio.wait(supervisors, timeout=STOP_WAIT_S)
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                log.warning("smtp worker %d (pid %d) did not stop; killing it", w.index, w.proc.pid)
                w.proc.kill()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._workers:
            if w.proc is not None:
                await asyncio.to_thread(w.proc.wait)
        for s in self._socks:
            s.close()

    async def _bind_all(self) -> list[socket.socket]:
        deadline = self._clock.monotonic_s() + BIND_WAIT_S
        socks: list[socket.socket] = []
        for host, port, _tls in listen_addrs(self._cfg):
            while True:
                try:
                    socks.append(bind(host, port))
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or self._clock.monotonic_s() > deadline:
                        for s in socks:
                            s.close()
                        raise
                    await asyncio.sleep(0.1)
        return socks

    async def _supervise(self, w: _Worker) -> None:
        delay = RESTART_MIN_S
        while not self._stopping:
            started = self._clock.monotonic_s()
            closed = asyncio.Event()
            try:
                await self._spawn(w, closed.set)
            except (OSError, MqnodeError) as exc:
                log.error("smtp worker %d did not start: %s", w.index, exc)
            else:
                await closed.wait()
                code = await asyncio.to_thread(self._reap, w)
                if not self._stopping:
                    log.error("smtp worker %d exited (%s); restarting it", w.index, code)
            self._retire(w)
            if self._stopping:
                return
            if self._clock.monotonic_s() - started > STABLE_S:
                delay = RESTART_MIN_S
            self.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _spawn(self, w: _Worker, on_closed: Callable[[], None]) -> None:
        parent, child = socket.socketpair()
        spec = {
            "index": w.index,
            "link_fd": child.fileno(),
            "listen_fds": [s.fileno() for s in self._socks],
            "config": dataclasses.asdict(self._cfg),
        }
        env = dict(os.environ)
        # the worker imports mqnode from where this node did, installed or not
        package_root = str(Path(mqnode.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            w.proc = subprocess.Popen(
                [sys.executable, "-m", "mqnode.smtp.worker_process", json.dumps(spec)],
                pass_fds=(child.fileno(), *(s.fileno() for s in self._socks)),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        link = Link(lambda msg: self._on_message(w, msg), on_closed)
        w.link = link
        await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=parent)
        link.send(self._fill())
        log.info("smtp worker %d started (pid %d)", w.index, w.proc.pid)

    def _reap(self, w: _Worker) -> str:
        assert w.proc is not None
        try:
            code = w.proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            w.proc.kill()  # closed its link but lingers: not a worker we can use
            code = w.proc.wait()
        return f"signal {-code}" if code < 0 else f"exit code {code}"

    def _retire(self, w: _Worker) -> None:
        for key, n in w.keys.items():
            for _ in range(n):
                self._limits.close(key)
        w.keys.clear()
        self._retired = (self._retired[0] + w.counts[0], self._retired[1] + w.counts[1])
        w.counts = (0, 0)
        signed, failed = self._retired_dkim
        for domain, n in w.dkim[0].items():
            signed[domain] = signed.get(domain, 0) + n
        self._retired_dkim = (signed, failed + w.dkim[1])
        self._retired_suppressed += w.suppressed
        w.suppressed = 0
        w.dkim = ({}, 0)
        w.link = None
        w.up = False

    def _fill(self) -> list[Any]:
        return [FILL, self._fill_ratio(), self.suppression_count(), self.level()]

    async def _push_fill(self) -> None:
        while True:
            await asyncio.sleep(FILL_PUSH_S)
            fill = self._fill()
            for w in self._workers:
                if w.link is not None:
                    w.link.send(fill)

    # --- requests -----------------------------------------------------------------

    def _on_message(self, w: _Worker, msg: list[Any]) -> None:
        link, kind = w.link, msg[0]
        if link is None:
            return
        if kind == SUBMIT:
            task = asyncio.get_running_loop().create_task(self._submit(link, msg[1], msg[2]))
            self._submits.add(task)
            task.add_done_callback(self._submits.discard)
        elif kind == OPEN:
            key = str(msg[2])
            refusal = self._limits.open(key)
            if refusal is None:
                w.keys[key] += 1
            link.send([OPENED, msg[1], key, refusal])
        elif kind == CLOSE:
            key = str(msg[1])
            if w.keys[key] > 0:
                w.keys[key] -= 1
                self._limits.close(key)
        elif kind == MESSAGE:
            link.send([ALLOWED, msg[1], self._limits.allow_message(str(msg[2]))])
        elif kind == SUPPRESSED and isinstance(msg[2], list) and len(msg[2]) == 2:
            link.send([VERDICT, msg[1], self.suppression(str(msg[2][0]), str(msg[2][1]))])
        elif kind == UP:
            w.up = True
            log.info("smtp worker %d accepting (pid %s)", w.index, w.proc and w.proc.pid)
        elif kind == COUNTS:
            w.counts = (int(msg[1]), int(msg[2]))
            if len(msg) >= 5 and isinstance(msg[3], dict):
                signed = {str(d): int(n) for d, n in list(msg[3].items())[:MAX_DKIM_DOMAINS]}
                w.dkim = (signed, int(msg[4]))
            if len(msg) >= 6:
                w.suppressed = int(msg[5])
        else:
            log.warning("smtp worker %d: unexpected message kind %r", w.index, kind)

    async def _submit(self, link: Link, rid: int, wire: Any) -> None:
        try:
            cmd = from_wire(wire)
        except CodecError as exc:
            link.send([FAILED, rid, "submit", f"bad command from worker: {exc}"])
            return
        enqueue = cmd if isinstance(cmd, Enqueue) else None
        events = self.events if self.events is not None and self.events.active else None
        if enqueue is not None and events is not None:
            # The header is searched (a deflated body's inflated) for the event alone.
            signed = tuple(signing_domains(_header_part(enqueue))) if enqueue.body else ()
            emit_received(events, enqueue, signed)
        try:
            result = await self._submitter.submit(cmd)
        except SubmitError as exc:
            link.send([FAILED, rid, error_kind(exc), str(exc)])
            return
        except Exception:  # a worker's client must get an answer, never a hang
            log.exception("submission from an smtp worker failed")
            link.send([FAILED, rid, "submit", "internal error, try again later"])
            return
        queued = enqueue is not None and result[0] in ("queued", "duplicate")
        if queued and events is not None:
            emit_committed(events, result)
        link.send([RESULT, rid, result[0], result[1]])


def _header_part(enqueue: Enqueue) -> bytes:
    """Where an inline body's signatures are: the body, or its first inflated bytes."""
    body = enqueue.body or b""
    if enqueue.body_encoding == DEFLATE:
        return inflate_head(body, HEADER_SCAN_BYTES)
    return body
