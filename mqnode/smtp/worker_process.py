"""An SMTP worker process: aiosmtpd sessions on the node's sockets, commits through the node.

With `smtp_workers = N` the node runs N of these (smtpworkers.WorkerPool) so
SMTP parsing, which is most of a node's CPU per message, runs beside Raft on
other cores instead of sharing one interpreter lock with it. Started as
`python -m mqnode.smtp.worker_process SPEC`, SPEC a JSON object: the node's settings,
the worker's index, and the inherited descriptors of the link to the node
(smtp/worker_link.py) and of the listening sockets (the node bound them; every
worker accepts on the same ones, so a worker's death loses no queued
connection).

Contract:
* A client gets 250 only when the node answers the Enqueue's submission with
  queued or duplicate: the node's own commit contract, unchanged. Any other
  answer is the SMTP reply the node would have given (451/452, errors.py).
* Per-client limits are the node's (asked over the link); clients in
  `client_limit_exceptions` are not asked about. The storage-full check uses
  the fill ratio the node sends (smtpworkers.FILL_PUSH_S).
* A node that does not answer within its commit timeout + `ANSWER_MARGIN_S`
  (stopped with SIGSTOP, say) gets the client a 451 "outcome unknown".
* The node gone (end of file on the link, even after its kill -9): waiting
  submissions get 451, the listeners close, the process exits.
* SIGTERM: stop accepting, give submissions in flight up to `DRAIN_S`, exit.
  SIGINT is ignored (a terminal's Ctrl-C reaches the node, which stops us).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from mqnode import logsetup
from mqnode.clock import SystemClock
from mqnode.config import NodeConfig
from mqnode.errors import ConfigError, NoLeaderError, time_out
from mqnode.eventloop import run_event_loop
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.signing.signing_process import SigningProcess
from mqnode.smtp.front import build_ingress, listen_addrs, serve
from mqnode.smtp.handler import SmtpIngress
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
    error_from,
)
from mqnode.spool.commands import Command, EntrySizes, entry_sizes, to_wire
from mqnode.spool.statemachine import Result

log = logging.getLogger(__name__)

DRAIN_S = 3.0
ANSWER_MARGIN_S = 5.0
COUNTS_PUSH_S = 0.2


class NodeLink:
    """The worker's end of the link: the ingress's Submitter and ClientGate."""

    def __init__(self, timeout_s: float) -> None:
        self.link = Link(self._on_message, self._on_closed)
        self._timeout_s = timeout_s
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[list[Any]]] = {}
        self._fill = 0.0
        self._suppressions = 0  # entries in the suppression list, as the node last said
        self._level = 1  # the cluster's reads level, as the node last said
        self.gone = asyncio.Event()
        self.on_dkim: Callable[[dict[str, Any]], None] = lambda settings: None

    def fill_ratio(self) -> float:
        return self._fill

    def entry_sizes(self) -> EntrySizes:
        return entry_sizes(self._level)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def submit(self, cmd: Command) -> Result:
        reply = await self._ask(SUBMIT, to_wire(cmd))
        if reply[0] == FAILED:
            raise error_from(str(reply[2]), str(reply[3]))
        return str(reply[2]), str(reply[3])

    async def open(self, key: str) -> str | None:
        reply = await self._ask(OPEN, key)
        return None if reply[3] is None else str(reply[3])

    def close(self, key: str) -> None:
        self.link.send([CLOSE, key])

    async def allow_message(self, key: str) -> bool:
        return bool((await self._ask(MESSAGE, key))[2])

    async def suppressed(self, recipient: str, sender_domain: str) -> str | None:
        """Why the node's suppression list refuses this recipient, or None. Not asked while
        the list is empty (the count comes with the fill ratio, every FILL_PUSH_S)."""
        if not self._suppressions:
            return None
        reply = await self._ask(SUPPRESSED, [recipient, sender_domain])
        return None if reply[2] is None else str(reply[2])

    async def _ask(self, kind: int, arg: Any) -> list[Any]:
        if self.link.closed:
            raise NoLeaderError("the node process is gone; try again later")
        rid = self._next_id
        self._next_id += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting[rid] = future
        self.link.send([kind, rid, arg])
        # The node is alive but does not answer (stopped, or stuck): its commit
        # pipeline gives up sooner than this, so the outcome is unknown.
        timer = loop.call_later(self._timeout_s, time_out, future, "no answer from the node")
        try:
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(rid, None)

    def _on_message(self, msg: list[Any]) -> None:
        if msg[0] == FILL:
            self._fill = float(msg[1])
            self._suppressions = int(msg[2]) if len(msg) > 2 else 0
            self._level = int(msg[3]) if len(msg) > 3 else 1
            return
        if msg[0] == DKIM:
            self.on_dkim(msg[1] if len(msg) > 1 and isinstance(msg[1], dict) else {})
            return
        future = self._waiting.pop(msg[1], None) if len(msg) > 1 else None
        if future is not None and not future.done():
            future.set_result(msg)
        elif msg[0] == OPENED and msg[3] is None:
            self.close(str(msg[2]))  # granted to a connection that is gone meanwhile
        elif msg[0] not in (RESULT, FAILED, ALLOWED, OPENED, VERDICT):
            log.warning("worker link: unexpected message kind %r", msg[0])

    def _on_closed(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(NoLeaderError("the node process is gone; try again later"))
        self.gone.set()


async def _push_counts(node: NodeLink, ingress: SmtpIngress) -> None:
    last: list[Any] = []
    while not node.link.closed:
        counts = [
            ingress.accepted,
            ingress.refused,
            ingress.dkim_signed,
            ingress.dkim_failed,
            ingress.suppressed_refused,
        ]
        if counts != last:
            node.link.send([COUNTS, *counts])
            last = [*counts[:2], dict(ingress.dkim_signed), *counts[3:]]
        await asyncio.sleep(COUNTS_PUSH_S)


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    cfg = NodeConfig(**spec["config"])
    # the node answers within its commit timeout; this is the bound if it cannot
    node = NodeLink(cfg.commit_timeout_ms / 1000 + ANSWER_MARGIN_S)
    await loop.create_unix_connection(
        lambda: node.link, sock=socket.socket(fileno=int(spec["link_fd"]))
    )
    rng = random.Random()
    ingress = build_ingress(cfg, node, SystemClock(), rng.randbytes, node.fill_ratio, gate=node)
    ingress.suppressed = node.suppressed
    ingress.intake.sizes = node.entry_sizes
    # Big bodies are signed in a child, as the node signs them: in place, 25 MiB held
    # this worker's event loop, and every session on it, for about two seconds.
    signing = SigningProcess(cfg)
    ingress.intake.sign_away = signing.sign

    def reload_dkim(settings: dict[str, Any]) -> None:
        try:
            new_cfg = dataclasses.replace(cfg, **settings)
            signer = DkimSigner.from_config(new_cfg)
        except (ConfigError, TypeError) as exc:
            log.error("dkim reload refused, signing with the keys as they were: %s", exc)
            return
        ingress.set_signer(signer if signer.keys else None)
        signing.reload(new_cfg)

    node.on_dkim = reload_dkim
    socks = [socket.socket(fileno=int(fd)) for fd in spec["listen_fds"]]
    servers = await serve(ingress, listen_addrs(cfg), socks)
    node.link.send([UP])
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    counts = loop.create_task(_push_counts(node, ingress))
    log.info("smtp worker %s up", spec["index"])
    await asyncio.wait(
        [loop.create_task(stop.wait()), loop.create_task(node.gone.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for server in servers:
        server.close()
    if not node.gone.is_set():
        deadline = loop.time() + DRAIN_S
        while node.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        final = [
            ingress.accepted,
            ingress.refused,
            ingress.dkim_signed,
            ingress.dkim_failed,
            ingress.suppressed_refused,
        ]
        node.link.send([COUNTS, *final])
    counts.cancel()
    signing.close()
    node.link.close()
    why = "the node is gone" if node.gone.is_set() else "SIGTERM"
    log.info("smtp worker %s stopped (%s)", spec["index"], why)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(argv[1])
    cfg = spec["config"]
    logsetup.configure(
        str(cfg.get("log_level", "INFO")), f"{cfg.get('node_id')}/smtp{spec['index']}"
    )
    run_event_loop(run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
