"""SmtpIngress: the aiosmtpd handler that turns an SMTP transaction into queue entries.

A message is answered `250 2.0.0 Ok: queued as <id>` only after its Enqueue
command is committed by a Raft majority and applied to LMDB on this node
(`Replicator.submit`). Every other outcome is an explicit refusal:

    554 5.7.1  client outside `allowed_networks` (never an open relay)
    501 5.1.7 / 501 5.1.3  malformed sender / recipient address
    452 4.5.3  more than `max_recipients` recipients, or over 16 KiB of them
               (the envelope travels in one small log entry; RFC 5321 4.5.3.1.10)
    552 5.3.4  more than `max_message_bytes` (aiosmtpd enforces SIZE/DATA)
    452 4.3.1  storage nearly full (`store_full_ratio`)
    451 4.3.0  no leader, commit timeout, back-pressure: retry later

Retried submissions are safe: the idempotency key (sha256 of envelope and
original body) maps a repeat to the first queue id. Bodies above
`INLINE_BODY_MAX_BYTES` travel as PutChunk entries so no log entry is large.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .clock import Clock
from .commands import CHUNK_BYTES, INLINE_BODY_MAX_BYTES, Enqueue, PutChunk
from .errors import SubmitError
from .events import EventLog
from .model import find_message_id, make_queue_id
from .replicator import Replicator

log = logging.getLogger(__name__)

_ADDR_RE = re.compile(r"^[^\s@<>()\[\]\\,;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_RCPT_BYTES = 16 * 1024


def valid_address(addr: str, allow_empty: bool) -> bool:
    if addr == "":
        return allow_empty
    return len(addr) <= 254 and _ADDR_RE.fullmatch(addr) is not None


def idempotency_key(mail_from: str, rcpts: list[str], body: bytes) -> bytes:
    h = hashlib.sha256()
    h.update(mail_from.encode("utf-8", "surrogateescape") + b"\0")
    h.update("\0".join(rcpts).encode("utf-8", "surrogateescape") + b"\0")
    h.update(body)
    return h.digest()


class SmtpIngress:
    """aiosmtpd handler; see the module docstring for the reply contract."""

    def __init__(
        self,
        replicator: Replicator,
        clock: Clock,
        random_bytes: Callable[[int], bytes],
        node_id: str,
        hostname: str,
        allowed_networks: list[str],
        max_recipients: int,
        store_fill_ratio: Callable[[], float],
        store_full_ratio: float = 0.9,
    ) -> None:
        self._rep = replicator
        self._clock = clock
        self._random = random_bytes
        self._node_id = node_id
        self._hostname = hostname
        self._networks: list[Network] = [
            ipaddress.ip_network(n, strict=False) for n in allowed_networks
        ]
        self._max_rcpts = max_recipients
        self._fill_ratio = store_fill_ratio
        self._full_ratio = store_full_ratio
        self.accepted = 0
        self.refused = 0
        self.on_accepted: Callable[[], None] = lambda: None  # e.g. wake the dispatcher
        self.events: EventLog | None = None

    def _allowed(self, session: Session) -> bool:
        peer = session.peer
        if not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else peer)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            self.refused += 1
            return "554 5.7.1 Access denied: relaying from your network is not allowed"
        if not valid_address(address, allow_empty=True):
            return "501 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            return "554 5.7.1 Access denied"
        if not valid_address(address, allow_empty=False):
            return "501 5.1.3 Bad recipient address syntax"
        if len(envelope.rcpt_tos) >= self._max_rcpts:
            return f"452 4.5.3 Error: too many recipients (max {self._max_rcpts})"
        if sum(len(r) + 3 for r in envelope.rcpt_tos) + len(address) > MAX_RCPT_BYTES:
            # The envelope travels in one log entry, which must stay small.
            return "452 4.5.3 Error: too many recipients in this transaction, send the rest later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self._allowed(session):
            return "554 5.7.1 Access denied"
        if self._fill_ratio() >= self._full_ratio:
            self.refused += 1
            log.error("refusing mail: queue storage is %.0f%% full", self._fill_ratio() * 100)
            return "452 4.3.1 Insufficient system storage"
        body = envelope.original_content or b""
        try:
            queue_id = await self._enqueue(session, envelope, body)
        except SubmitError as exc:
            self.refused += 1
            log.warning("refused message from %s: %s", session.peer, exc)
            return exc.smtp_reply()
        self.accepted += 1
        self.on_accepted()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def _enqueue(self, session: Session, envelope: Envelope, body: bytes) -> str:
        now_ms = self._clock.wall_ms()
        queue_id = make_queue_id(now_ms, self._random(8))
        mail_from = envelope.mail_from or ""
        rcpts = list(envelope.rcpt_tos)
        idem = idempotency_key(mail_from, rcpts, body)
        message_id = find_message_id(body)
        if message_id is None:
            # Stable across attempts, so receivers can de-duplicate after a failover.
            message_id = f"<{queue_id}@{self._hostname}>"
            body = f"Message-ID: {message_id}\r\n".encode() + body
        body = self._received(session, queue_id, rcpts, now_ms) + body
        upload_id, chunks = "", 0
        inline: bytes | None = body
        if len(body) > INLINE_BODY_MAX_BYTES:
            upload_id, inline = queue_id, None
            parts = [body[i : i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)]
            chunks = len(parts)
            await self._upload(upload_id, parts, now_ms)
        peer: Any = session.peer
        cmd = Enqueue(
            queue_id=queue_id,
            received_ms=now_ms,
            mail_from=mail_from,
            recipients=tuple(rcpts),
            body=inline,
            upload_id=upload_id,
            chunks=chunks,
            body_size=len(body),
            body_sha256=hashlib.sha256(body).digest(),
            idem_key=idem,
            message_id=message_id,
            client=str(peer[0]) if isinstance(peer, tuple) else str(peer),
            node_id=self._node_id,
        )
        if self.events is not None:
            self.events.emit(
                "received",
                queue_id,
                client=cmd.client,
                sender=mail_from,
                nrcpt=len(rcpts),
                size=len(body),
                message_id=message_id,
            )
        status, value = await self._rep.submit(cmd)
        if status in ("queued", "duplicate"):
            if self.events is not None:
                self.events.emit("committed", value, duplicate=status == "duplicate")
            return value
        raise SubmitError(f"not queued: {value}")

    def _received(self, session: Session, queue_id: str, rcpts: list[str], now_ms: int) -> bytes:
        peer: Any = session.peer
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        date = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
        )
        rcpt = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ([{ip}])\r\n\tby {self._hostname} (mqnode) with ESMTP "
            f"id {queue_id}{rcpt};\r\n\t{date}\r\n"
        ).encode("utf-8", "replace")

    async def _upload(self, upload_id: str, parts: list[bytes], now_ms: int) -> None:
        results = await asyncio.gather(
            *(self._rep.submit(PutChunk(upload_id, i, p, now_ms)) for i, p in enumerate(parts)),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, SubmitError):
                    raise r
                raise SubmitError(f"upload failed: {r}") from r
