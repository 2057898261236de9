"""Intake: the one path from a finished message to a committed Enqueue.

SMTP (smtp/handler.py, in the node or in a worker process) and the HTTP
injection API (api/) hand it an envelope and a body; it puts the empty line
after a header section that lacks it and removes the Bcc fields (as Postfix's
cleanup does: spool/header_section.py), adds a Message-ID if there is none
(stable across attempts, so receivers can de-duplicate after a failover) and
a Date if there is none (the receive time), the DKIM signatures (over the
body with the CRLF line ends it will be sent with: spool/line_ends.py) and a
trace header, deflates a body that compresses (mqnode/compression.py) or
stages a large one as PutChunk entries, and returns only once the Enqueue is
committed by a Raft majority and applied here: `("queued", id)`, or
`("duplicate", first id)` for a submission whose idempotency key was seen in
the last 24 hours (spool/statemachine.py IDEM_WINDOW_MS). A message with
`hopcount_limit` Received fields is in a mail loop: MailLoopError (554 5.4.6).
Anything else raises SubmitError (the caller answers 451 / 503).

The idempotency key is the caller's: SMTP's is the sha256 of envelope and
original body (`idempotency_key`), the API's is the client's Idempotency-Key
with its principal. It is taken before anything is added to the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mqnode.clock import Clock
from mqnode.compression import DEFLATE_BELOW, DEFLATE_FROM_BYTES, deflate, sampled_ratio
from mqnode.errors import BackpressureError, MailLoopError, NoLeaderError, SubmitError
from mqnode.events import EventLog
from mqnode.raft.commit_pipeline import Submitter
from mqnode.signing.dkim_signer import DkimSigner, SigningError
from mqnode.signing.signing_process import AWAY_FROM_BYTES
from mqnode.spool.commands import DEFLATE, SMALL_ENTRIES, Enqueue, EntrySizes, PutChunk
from mqnode.spool.header_section import HOPCOUNT_LIMIT, inspect, rfc5322_date
from mqnode.spool.line_ends import crlf_line_ends
from mqnode.spool.model import find_message_id, make_queue_id
from mqnode.spool.statemachine import Result, misses_chunks

log = logging.getLogger(__name__)

# A large body's chunks submitted at once: a 5 MiB body is 6 chunks of the cluster's big
# entries, 108 of its small ones (spool/commands.py EntrySizes).
CHUNKS_IN_FLIGHT = 8


def _distinct(
    rcpts: tuple[str, ...], dsn: dict[str, Any]
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The recipients without repeats, and their DSN fields to match.

    A client that names one recipient twice (RCPT TO twice, or To and Cc alike in the
    API) gets one copy delivered, as Postfix's cleanup makes it: a repeat is the same
    address but for case, with the same NOTIFY and ORCPT (RFC 3461), which Postfix
    compares too. Both have been answered 250."""
    if len(rcpts) < 2:
        return rcpts, dsn
    notify: tuple[str, ...] = dsn.get("dsn_notify", ())
    orcpt: tuple[str, ...] = dsn.get("dsn_orcpt", ())
    seen: set[tuple[str, str, str]] = set()
    keep: list[int] = []
    for i, rcpt in enumerate(rcpts):
        key = (rcpt.lower(), notify[i] if notify else "", orcpt[i] if orcpt else "")
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(rcpts):
        return rcpts, dsn
    out = dict(dsn)
    if notify:
        out["dsn_notify"] = tuple(notify[i] for i in keep)
    if orcpt:
        out["dsn_orcpt"] = tuple(orcpt[i] for i in keep)
    return tuple(rcpts[i] for i in keep), out


def idempotency_key(mail_from: str, rcpts: Sequence[str], body: bytes) -> bytes:
    """SMTP's key: the same envelope and original body is the same submission."""
    h = hashlib.sha256()
    h.update(mail_from.encode("utf-8", "surrogateescape") + b"\0")
    h.update("\0".join(rcpts).encode("utf-8", "surrogateescape") + b"\0")
    h.update(body)
    return h.digest()


@dataclass(frozen=True)
class Submission:
    """One message as a door hands it over."""

    mail_from: str  # "" for the null sender
    rcpts: tuple[str, ...]
    body: bytes  # as the client sent it (before Message-ID, signatures, trace header)
    idem: bytes
    client: str  # the client's address, for the log and events
    # The trace header for this queue id and receive time (SMTP: Received; API: its own).
    trace: Callable[[str, int], bytes]
    dsn: dict[str, Any] = field(default_factory=dict)  # Enqueue's dsn_* fields


@dataclass(frozen=True)
class Accepted:
    status: str  # "queued" | "duplicate"
    queue_id: str
    message_id: str


class Intake:
    """See the module docstring. One per door (SMTP ingress, API server)."""

    def __init__(
        self,
        submitter: Submitter,
        clock: Clock,
        random_bytes: Callable[[int], bytes],
        node_id: str,
        hostname: str,
        signer: DkimSigner | None = None,
    ) -> None:
        self._rep = submitter
        self._clock = clock
        self._random = random_bytes
        self._node_id = node_id
        self._hostname = hostname
        self.signer = signer  # None or no keys: nothing is signed (a reload replaces it)
        # Where a body of AWAY_FROM_BYTES or more is signed instead, with the same keys:
        # the node's child process (signing/signing_process.py); None: here.
        self.sign_away: Callable[[bytes, int], Awaitable[tuple[bytes, tuple[str, ...]]]] | None
        self.sign_away = None
        self.events: EventLog | None = None
        self.dkim_signed: dict[str, int] = {}  # messages signed, by signing domain
        self.dkim_failed = 0  # messages refused because signing failed
        # The entry sizes the cluster carries now (formats.LevelGate.entry_sizes, or the
        # level a worker's node last pushed); set by whoever builds the door.
        self.sizes: Callable[[], EntrySizes] = lambda: SMALL_ENTRIES
        # A message with this many Received fields is refused (MailLoopError, 554 5.4.6).
        self.hopcount_limit = HOPCOUNT_LIMIT

    async def accept(self, sub: Submission) -> Accepted:
        now_ms = self._clock.wall_ms()
        queue_id = make_queue_id(now_ms, self._random(8))
        header = inspect(sub.body)
        if header.received >= self.hopcount_limit:
            raise MailLoopError("Error: too many hops")
        body = header.message  # our fields go on top of its header section
        message_id = find_message_id(body)
        added = b""  # Message-ID and Date fields, in front of the body (not joined to it here)
        if message_id is None:
            message_id = f"<{queue_id}@{self._hostname}>"
            added = f"Message-ID: {message_id}\r\n".encode()
        if not header.has_date:  # RFC 5322 asks for one; a submission server adds it (RFC 6409)
            added += f"Date: {rfc5322_date(now_ms // 1000)}\r\n".encode()
        signatures = b""
        signed_by: tuple[str, ...] = ()
        if self.signer is not None:
            # Signed as it will be sent: delivery makes bare CRs and LFs CRLF (spool/line_ends.py)
            body, added = added + crlf_line_ends(body), b""
            # After the idempotency key (a retry is the same message) and the Message-ID
            # (which is signed); t= is the receive time this command carries.
            try:
                if self.sign_away is not None and len(body) >= AWAY_FROM_BYTES:
                    signatures, signed_by = await self.sign_away(body, now_ms // 1000)
                else:
                    signatures, signed_by = self.signer.sign(body, now_ms // 1000)
            except SigningError as exc:
                self.dkim_failed += 1
                log.error("refused message from %s: %s", sub.client, exc)
                raise SubmitError("message not signed; try again later") from exc
            for domain in signed_by:
                self.dkim_signed[domain] = self.dkim_signed.get(domain, 0) + 1
        head = signatures + sub.trace(queue_id, now_ms) + added
        size = len(head) + len(body)
        digest = hashlib.sha256(head)
        digest.update(body)
        upload_id, chunks = "", 0
        parts: list[bytes] = []
        sizes = self.sizes()
        envelope = _envelope_bytes(sub)
        inline = _deflated(head, body, sizes.inline_max - envelope, sizes)
        encoding = "" if inline is None else DEFLATE
        if inline is None and size + envelope > sizes.inline_max:
            upload_id = queue_id
            parts = _chunks(head, body, sizes.chunk)
            chunks = len(parts)
        elif inline is None:
            inline = head + body
        rcpts, dsn = _distinct(sub.rcpts, sub.dsn)
        cmd = Enqueue(
            queue_id=queue_id,
            received_ms=now_ms,
            mail_from=sub.mail_from,
            recipients=rcpts,
            body=inline,
            upload_id=upload_id,
            chunks=chunks,
            body_size=size,
            body_sha256=digest.digest(),
            idem_key=sub.idem,
            message_id=message_id,
            client=sub.client,
            node_id=self._node_id,
            **dsn,
            body_encoding=encoding,
        )
        if self.events is not None:
            emit_received(self.events, cmd, signed_by)
        status, value = await self._submit_with_chunks(cmd, parts, now_ms)
        if status in ("queued", "duplicate"):
            if self.events is not None:
                emit_committed(self.events, (status, value))
            return Accepted(status, value, message_id)
        raise SubmitError(f"not queued: {value}")

    async def _submit_with_chunks(
        self, cmd: Enqueue, parts: list[bytes], now_ms: int
    ) -> tuple[str, str]:
        """Submit the body chunks and the Enqueue together: one commit round, not two,
        for bodies of up to `CHUNKS_IN_FLIGHT` chunks (bigger ones: a round per window).

        The pipeline keeps submission order, so the Enqueue is applied after its
        chunks; apply rejects it if one is missing (a chunk retried after a leader
        change lands later). Then the chunks are sent again and, once all of them
        are committed, the Enqueue once more: the client gets 451 only if that
        fails too. The Enqueue's result alone decides: once it is queued every
        chunk was there.
        """
        if not parts:  # the common case: no tasks for asyncio.gather to make
            try:
                return await self._rep.submit(cmd)
            except SubmitError:
                raise
            except Exception as exc:
                raise SubmitError(f"submit failed: {exc}") from exc
        last = await self._submit_in_windows(cmd, parts, now_ms, with_enqueue=True)
        if misses_chunks(last):
            log.info("%s: %s; sending its chunks again", cmd.queue_id, last[1])
            await self._submit_in_windows(cmd, parts, now_ms, with_enqueue=False)
            last = _result_or_raise(await self._rep.submit(cmd))
        return last

    async def _submit_in_windows(
        self, cmd: Enqueue, parts: list[bytes], now_ms: int, with_enqueue: bool
    ) -> Result:
        """The chunks, `CHUNKS_IN_FLIGHT` at a time; the last window carries the Enqueue
        (`with_enqueue`), whose result is returned. All at once, twenty 5 MiB messages
        were 2,160 commands, past `max_pending_commits`: each was refused 451. A chunk's
        own result is not needed (the Enqueue's decides), but a refusal stops the rest."""
        result: Result = ("ok", "")
        for start in range(0, len(parts), CHUNKS_IN_FLIGHT):
            window = [
                self._rep.submit(PutChunk(cmd.upload_id, i, parts[i], now_ms))
                for i in range(start, min(start + CHUNKS_IN_FLIGHT, len(parts)))
            ]
            last_window = start + CHUNKS_IN_FLIGHT >= len(parts)
            if last_window and with_enqueue:
                window.append(self._rep.submit(cmd))
            results = await asyncio.gather(*window, return_exceptions=True)
            if last_window and with_enqueue:
                return _result_or_raise(results[-1])
            for outcome in results:
                if isinstance(outcome, BackpressureError | NoLeaderError):
                    raise outcome
        return result


# Deflate only when samples promise a stream this far under the room an inline body has
# (a body that deflates to more goes as it is, in chunks: its deflate was wasted).
DEFLATE_ROOM_MARGIN = 1.25


def _deflated(head: bytes, body: bytes, room: int, sizes: EntrySizes) -> bytes | None:
    """`head + body` deflated (compression.py) when the cluster reads deflated bodies,
    the body is big enough and compresses, and the stream fits in an inline Enqueue
    (`room` bytes); else None."""
    size = len(head) + len(body)
    if not sizes.deflate_bodies or size < DEFLATE_FROM_BYTES:
        return None
    ratio = sampled_ratio(body)
    if ratio >= DEFLATE_BELOW or size * ratio * DEFLATE_ROOM_MARGIN > room:
        return None
    stream = deflate(head, body)
    return stream if len(stream) <= room else None


def _chunks(head: bytes, body: bytes, step: int) -> list[bytes]:
    """`head + body` cut into pieces of `step` bytes, each byte copied once (not into
    the whole first and then into its piece)."""
    if not head or len(head) >= step:  # a chunk is 48 KiB or more: not with our headers
        whole = head + body
        return [whole[i : i + step] for i in range(0, len(whole), step)]
    first = step - len(head)
    parts = [b"".join([head, memoryview(body)[:first]])]
    parts += [body[i : i + step] for i in range(first, len(body), step)]
    return parts


def _envelope_bytes(sub: Submission) -> int:
    """About what the envelope adds to an inline Enqueue (with msgpack's framing)."""
    return 256 + len(sub.mail_from) + sum(len(r) + 8 for r in sub.rcpts)


def emit_received(events: EventLog, cmd: Enqueue, dkim: tuple[str, ...] = ()) -> None:
    """The `received` event, from the Enqueue about to be submitted (here or by a worker);
    `dkim`: the domains that signed it."""
    events.emit(
        "received",
        cmd.queue_id,
        client=cmd.client,
        sender=cmd.mail_from,
        nrcpt=len(cmd.recipients),
        size=cmd.body_size,
        message_id=cmd.message_id,
        **({"dkim": list(dkim)} if dkim else {}),
    )


def emit_committed(events: EventLog, result: Result) -> None:
    events.emit("committed", result[1], duplicate=result[0] == "duplicate")


def _result_or_raise(outcome: Result | BaseException) -> Result:
    if isinstance(outcome, BaseException):
        if isinstance(outcome, SubmitError):
            raise outcome
        raise SubmitError(f"submit failed: {outcome}") from outcome
    return outcome
