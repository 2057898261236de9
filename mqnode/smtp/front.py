"""The SMTP front end built from a NodeConfig: the same in the node and in a worker process.

`build_ingress` makes the aiosmtpd handler with the node's limits, AUTH and
TLS; `serve` starts the listeners (the submission port and, when set, the
implicit-TLS port). A worker process gets the listening sockets from the node
(inherited), the node binds its own when it has no workers: `InProcessFront`,
which the node drives like smtpworkers.WorkerPool (start, stop, counts,
describe, events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from typing import Any

from mqnode.clock import Clock
from mqnode.config import NodeConfig, parse_hostport
from mqnode.events import EventLog
from mqnode.raft.commit_pipeline import Submitter
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.smtp.auth import UserDb
from mqnode.smtp.handler import IngressLimits, SmtpIngress
from mqnode.smtp.protocol import SubmissionProtocol
from mqnode.smtp.ratelimit import ClientGate
from mqnode.tls import server_context

LISTEN_BACKLOG = 1024


def build_ingress(
    cfg: NodeConfig,
    submitter: Submitter,
    clock: Clock,
    random_bytes: Callable[[int], bytes],
    fill_ratio: Callable[[], float],
    gate: ClientGate | None = None,
) -> SmtpIngress:
    return SmtpIngress(
        submitter,
        clock,
        random_bytes,
        cfg.node_id,
        cfg.hostname,
        cfg.allowed_networks,
        cfg.max_recipients,
        fill_ratio,
        limits=ingress_limits(cfg),
        # AUTH needs TLS: without it principals are for the HTTP API alone.
        users=UserDb.for_node(
            cfg.smtp_users_file, cfg.principals_file if cfg.smtp_tls_cert else ""
        ),
        tls=server_context(cfg.smtp_tls_cert, cfg.smtp_tls_key) if cfg.smtp_tls_cert else None,
        gate=gate,
        signer=DkimSigner.from_config(cfg) if cfg.dkim_keys else None,
    )


def ingress_limits(cfg: NodeConfig) -> IngressLimits:
    return IngressLimits(
        max_message_bytes=cfg.max_message_bytes,
        max_header_count=cfg.max_header_count,
        hopcount_limit=cfg.hopcount_limit,
        max_commands_per_session=cfg.max_commands_per_session,
        idle_timeout_s=cfg.smtp_idle_timeout_s,
        connection_rate_per_min=cfg.client_connection_rate_per_min,
        message_rate_per_min=cfg.client_message_rate_per_min,
        max_connections_per_client=cfg.client_max_connections,
        exempt_networks=tuple(cfg.client_limit_exceptions),
    )


def listen_addrs(cfg: NodeConfig) -> list[tuple[str, int, bool]]:
    """(host, port, implicit TLS) of every SMTP listener, the submission port first."""
    addrs = [(*parse_hostport(cfg.smtp_addr, "smtp_addr"), False)]
    if cfg.smtps_addr:  # implicit TLS (RFC 8314); the handshake happens before SMTP
        addrs.append((*parse_hostport(cfg.smtps_addr, "smtps_addr"), True))
    return addrs


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for `host:port` (what asyncio's create_server would bind)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    ingress: SmtpIngress, addrs: list[tuple[str, int, bool]], socks: list[socket.socket] | None
) -> list[asyncio.Server]:
    """Start a listener per address, on `socks[i]` when given (inherited), else binding."""
    loop = asyncio.get_running_loop()
    servers = []
    for i, (host, port, implicit_tls) in enumerate(addrs):

        def factory(tls: bool = implicit_tls) -> SubmissionProtocol:
            return SubmissionProtocol(ingress, implicit_tls=tls)

        ssl_ctx = ingress.tls if implicit_tls else None
        if socks is None:
            server = await loop.create_server(factory, host, port, ssl=ssl_ctx)
        else:
            server = await loop.create_server(factory, sock=socks[i], ssl=ssl_ctx)
        servers.append(server)
    return servers


class InProcessFront:
    """SMTP sessions in the node's own process (`smtp_workers = 0`)."""

    def __init__(self, cfg: NodeConfig, ingress: SmtpIngress) -> None:
        self._cfg = cfg
        self.ingress = ingress
        self._servers: list[asyncio.Server] = []

    @property
    def events(self) -> EventLog | None:
        return self.ingress.events

    @events.setter
    def events(self, events: EventLog | None) -> None:
        self.ingress.events = events

    async def start(self) -> None:
        self._servers = await serve(self.ingress, listen_addrs(self._cfg), None)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()

    def counts(self) -> tuple[int, int]:
        """(accepted, refused) DATA replies so far."""
        return self.ingress.accepted, self.ingress.refused

    def dkim_counts(self) -> tuple[dict[str, int], int]:
        """(messages signed by domain, messages refused because signing failed)."""
        return dict(self.ingress.dkim_signed), self.ingress.dkim_failed

    def suppressed_refused(self) -> int:
        """Recipients refused at RCPT TO as suppressed."""
        return self.ingress.suppressed_refused

    def set_suppression(
        self, reason: Callable[[str, str], str | None], count: Callable[[], int]
    ) -> None:
        """Refuse suppressed recipients at RCPT TO (a local read: no count needed)."""

        async def suppressed(recipient: str, sender_domain: str) -> str | None:
            return reason(recipient, sender_domain)

        self.ingress.suppressed = suppressed

    def set_dkim(self, settings: dict[str, Any]) -> None:
        """Sign with these dkim_* settings from now on (ConfigError: keep the old keys)."""
        self._cfg = dataclasses.replace(self._cfg, **settings)
        signer = DkimSigner.from_config(self._cfg)
        self.ingress.set_signer(signer if signer.keys else None)

    def describe(self) -> dict[str, Any] | None:
        return None  # /status: no worker processes

    def up(self) -> tuple[int, int]:
        """(workers accepting, workers configured): none, sessions run in this process."""
        return 0, 0
