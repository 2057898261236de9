"""SmtpIngress: the aiosmtpd handler that turns an SMTP transaction into queue entries.

A message is answered `250 2.0.0 Ok: queued as <id>` only after its Enqueue
command is committed by a Raft majority and applied to LMDB on this node
(`Replicator.submit`). Every other outcome is an explicit refusal:

    554 5.7.1  client outside `allowed_networks` and not authenticated
               (never an open relay)
    501 5.1.7 / 501 5.1.3  malformed sender / recipient address
    452 4.5.3  more than `max_recipients` recipients, or over 16 KiB of them
               (the envelope travels in one small log entry; RFC 5321 4.5.3.1.10)
    552 5.3.4  more than `max_message_bytes` (aiosmtpd enforces SIZE/DATA), or
               more than `max_header_count` header fields
    554 5.4.6  `hopcount_limit` Received fields or more: a mail loop (Postfix
               answers 554 5.4.0 at 50)
    (the two per-client limits below skip `client_limit_exceptions`, loopback by
    default, like Postfix's smtpd_client_event_limit_exceptions)
    450 4.7.1  this client IP started more than `client_message_rate_per_min`
               messages in the last minute (checked at MAIL)
    421 4.7.0  (instead of the greeting) over `client_connection_rate_per_min`
               or `client_max_connections` for this client IP
    452 4.3.1  storage nearly full (`store_full_ratio`)
    451 4.3.0  no leader, commit timeout, back-pressure, internal error: retry later

Session mechanics (STARTTLS, AUTH, command and idle limits) live in
`smtpserver.SubmissionProtocol`; the handler decides policy. Per-client
limits key on the IP address (an IPv6 client on its /64).

Retried submissions are safe: the idempotency key (sha256 of envelope and
original body) maps a repeat to the first queue id. The message then goes
through intake.py (Message-ID, DKIM, the Received header, the commit), as
the HTTP API's do.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from mqnode.clock import Clock
from mqnode.errors import SubmitError
from mqnode.events import EventLog
from mqnode.intake import Intake, Submission, idempotency_key
from mqnode.raft.commit_pipeline import Submitter
from mqnode.signing.dkim_signer import DkimSigner
from mqnode.smtp.auth import UserDb
from mqnode.smtp.ratelimit import ClientGate, ClientLimits, LocalGate
from mqnode.spool import addresses
from mqnode.spool.header_section import HOPCOUNT_LIMIT, rfc5322_date

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_RCPT_BYTES = 16 * 1024


# Password checks (scrypt, ~16 MiB each) running at once; more wait their turn.
AUTH_CHECK_SLOTS = 2


@dataclass(frozen=True)
class IngressLimits:
    """Per-session and per-client limits; each has its own SMTP reply (module docstring)."""

    max_message_bytes: int = 25 * 1024 * 1024
    max_header_count: int = 1000
    hopcount_limit: int = HOPCOUNT_LIMIT
    max_commands_per_session: int = 10_000
    idle_timeout_s: float = 300.0
    connection_rate_per_min: int = 600
    message_rate_per_min: int = 6000
    max_connections_per_client: int = 100
    max_auth_failures: int = 3
    # Clients here skip the per-client rate and connection limits (Postfix's
    # smtpd_client_event_limit_exceptions): local submission and bench tools.
    exempt_networks: tuple[str, ...] = ()


class DsnEnvelope(Envelope):
    """aiosmtpd's envelope with the RFC 3461 parameters its MAIL and RCPTs gave
    (recorded by SubmissionProtocol once this handler accepted the command)."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn_mail = ("", "")  # (RET, ENVID)
        self.dsn_rcpts: list[tuple[str, str]] = []  # (NOTIFY, ORCPT) by recipient, once any

    def add_rcpt_dsn(self, notify_orcpt: tuple[str, str], count: int) -> None:
        """Record the `count`th accepted recipient's; the list is built only once one has any."""
        if notify_orcpt != ("", "") or self.dsn_rcpts:
            self.dsn_rcpts += [("", "")] * (count - 1 - len(self.dsn_rcpts)) + [notify_orcpt]

    def enqueue_fields(self) -> dict[str, Any]:
        """The Enqueue's dsn_* fields ({} when the client asked for nothing)."""
        ret, envid = self.dsn_mail
        if not (ret or envid or self.dsn_rcpts):
            return {}
        rcpts = self.dsn_rcpts + [("", "")] * (len(self.rcpt_tos) - len(self.dsn_rcpts))
        notify = tuple(n for n, _ in rcpts)
        orcpt = tuple(o for _, o in rcpts)
        return {
            "dsn_ret": ret,
            "dsn_envid": envid,
            "dsn_notify": notify if any(notify) else (),
            "dsn_orcpt": orcpt if any(orcpt) else (),
        }


def client_limits(limits: IngressLimits, clock: Clock) -> ClientLimits:
    """The per-client counters for these limits (one set per node process)."""
    return ClientLimits(
        limits.connection_rate_per_min,
        limits.message_rate_per_min,
        limits.max_connections_per_client,
        clock,
    )


def valid_address(addr: str, allow_empty: bool, utf8: bool = True) -> bool:
    """RFC 5321/6531 mailbox syntax (spool/addresses.py); "" is the null path."""
    if addr == "":
        return allow_empty
    return addresses.check(addr, utf8) is None


def _address_reply(address: str, envelope: Envelope, status: str, what: str) -> str | None:
    """The refusal of a MAIL or RCPT address, or None if it is a valid mailbox."""
    utf8 = bool(getattr(envelope, "smtp_utf8", False))
    why = addresses.check(address, utf8)
    if why is None:
        return None
    if not utf8 and not address.isascii():
        return f"553 5.6.7 Non-ASCII {what} address needs MAIL ... SMTPUTF8 (RFC 6531)"
    return f"501 {status} Bad {what} address syntax: {why}"


def header_count(body: bytes, stop_after: int) -> int:
    """Header fields before the first empty line of `body`; counting stops past `stop_after`."""
    count, pos, size = 0, 0, len(body)
    while pos < size and count <= stop_after:
        end = body.find(b"\n", pos)
        line = body[pos : size if end < 0 else end]
        if line in (b"", b"\r"):
            break
        if line[:1] not in (b" ", b"\t"):  # a folded line continues the previous field
            count += 1
        if end < 0:
            break
        pos = end + 1
    return count


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of `cls` aiosmtpd looks up by prefix, computed once per class.

    aiosmtpd builds its command and AUTH tables with `inspect.getmembers(self)`
    and `dir()` on every new connection, which evaluates every attribute of the
    session and the handler: about a third of a millisecond per connection, a
    tenth of the node's CPU at a few hundred connections a second. A `__dir__`
    answering from this per-class cache gives aiosmtpd the same tables.
    """
    per_class: dict[tuple[str, ...], list[str]] | None = cls.__dict__.get("_mq_hook_names")
    if per_class is None:
        per_class = {}
        cls._mq_hook_names = per_class  # type: ignore[attr-defined]
    cached = per_class.get(prefixes)
    if cached is None:
        cached = per_class[prefixes] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return cached


def peer_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return _parse_ip(peer[0] if isinstance(peer, tuple) else peer)
    except (ValueError, TypeError, IndexError):
        return None


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parsed once per address: clients reconnect for every message (ValueError is not cached)."""
    return ipaddress.ip_address(text)


class NetworkSet:
    """Whether an address is in any of a fixed list of networks, remembered per address.

    Asked on every connection and every MAIL, RCPT and DATA; clients reconnect
    for each message, so the same few addresses come back all the time.
    """

    MEMO_MAX = 4096  # distinct addresses remembered; then it starts over

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._memo: dict[Any, bool] = {}

    def contains(self, ip: Any) -> bool:
        found = self._memo.get(ip)
        if found is None:
            if len(self._memo) >= self.MEMO_MAX:
                self._memo.clear()
            found = self._memo[ip] = any(ip in net for net in self.networks)
        return found


def client_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Rate-limit key: the IPv4 address, or the /64 of an IPv6 one (one site, many addresses)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SmtpIngress:
    """aiosmtpd handler; see the module docstring for the reply contract."""

    def __dir__(self) -> list[str]:
        # aiosmtpd scans the handler with getmembers()/dir() on every connection;
        # only its hook names matter to it (see hook_names).
        return hook_names(type(self), ("handle_", "auth_"))

    def __init__(
        self,
        submitter: Submitter,
        clock: Clock,
        random_bytes: Callable[[int], bytes],
        node_id: str,
        hostname: str,
        allowed_networks: list[str],
        max_recipients: int,
        store_fill_ratio: Callable[[], float],
        store_full_ratio: float = 0.9,
        *,
        limits: IngressLimits | None = None,
        users: UserDb | None = None,
        tls: ssl.SSLContext | None = None,
        gate: ClientGate | None = None,
        signer: DkimSigner | None = None,
    ) -> None:
        # Message-ID, DKIM, trace header, commit (intake.py); signer None: nothing is signed.
        self.intake = Intake(submitter, clock, random_bytes, node_id, hostname, signer)
        self._hostname = hostname
        self.hostname = hostname
        self.limits = limits or IngressLimits()
        self.intake.hopcount_limit = self.limits.hopcount_limit
        self.users = users  # None: no AUTH offered
        self.tls = tls  # None: no STARTTLS offered
        self._gate = gate or LocalGate(client_limits(self.limits, clock))
        self._auth_slots = asyncio.Semaphore(AUTH_CHECK_SLOTS)
        self._exempt_networks = NetworkSet(self.limits.exempt_networks)
        self._networks = NetworkSet(allowed_networks)
        self._max_rcpts = max_recipients
        self._fill_ratio = store_fill_ratio
        self._full_ratio = store_full_ratio
        self.accepted = 0
        self.refused = 0
        # Never name an attribute auth_* or handle_*: aiosmtpd takes those for AUTH
        # mechanisms and hooks.
        self.failed_logins = 0
        # (recipient, sender's domain) -> why it is suppressed, or None (spool/suppression.py);
        # None: no suppression list is consulted.
        self.suppressed: Callable[[str, str], Awaitable[str | None]] | None = None
        self.suppressed_refused = 0  # recipients refused at RCPT because they are suppressed

    def set_signer(self, signer: DkimSigner | None) -> None:
        """Sign with these keys from the next message on (a DKIM reload)."""
        self.intake.signer = signer

    @property
    def events(self) -> EventLog | None:
        return self.intake.events

    @events.setter
    def events(self, events: EventLog | None) -> None:
        self.intake.events = events

    @property
    def dkim_signed(self) -> dict[str, int]:
        """Messages signed, by signing domain."""
        return self.intake.dkim_signed

    @property
    def dkim_failed(self) -> int:
        """Messages refused because signing failed."""
        return self.intake.dkim_failed

    def _allowed(self, session: Session) -> bool:
        if session.authenticated:
            return True  # an authenticated user may submit from any network
        ip = peer_ip(session.peer)
        return ip is not None and self._networks.contains(ip)

    def _exempt(self, ip: Any) -> bool:
        return self._exempt_networks.contains(ip)

    # --- connections (called by SubmissionProtocol) ---------------------------

    async def open_connection(self, peer: Any) -> tuple[str | None, str | None]:
        """(key to pass to close_connection, or None; refusal reply, or None to go on)."""
        ip = peer_ip(peer)
        if ip is None or self._exempt(ip):
            return None, None
        key = client_key(ip)
        refused = await self._gate.open(key)
        if refused is None:
            return key, None
        self.refused += 1
        if refused == "rate":
            log.warning("client %s over client_connection_rate_per_min", key)
            return None, f"421 4.7.0 {self._hostname} Error: too many connections from {ip}"
        log.warning("client %s over client_max_connections", key)
        return None, f"421 4.7.0 {self._hostname} Error: too many open connections from {ip}"

    def close_connection(self, key: str) -> None:
        self._gate.close(key)

    async def verify(self, login: bytes, password: bytes) -> str | None:
        """The user name for a right login/password, else None (scrypt, off the event loop)."""
        if self.users is None:
            return None
        async with self._auth_slots:
            user = await asyncio.to_thread(self.users.verify, login, password)
        if user is None:
            self.failed_logins += 1
        return user

    # --- aiosmtpd hooks --------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.users is None:  # aiosmtpd would announce an empty "AUTH" line
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        # RFC 2920, as Postfix: a client may send MAIL, RCPT... and DATA without waiting
        # for each reply. aiosmtpd reads and answers commands strictly in order, and
        # drops what arrives in plaintext behind STARTTLS (RFC 3207 4.2).
        # RFC 3461 DSN: the parameters are parsed in smtp/protocol.py and kept per message.
        return [*responses[:-1], "250-PIPELINING", "250-DSN", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            self.refused += 1
            return "554 5.7.1 Access denied: relaying from your network is not allowed"
        # aiosmtpd hands over the null reverse path (bounces) as "<>"; it stays so in the
        # envelope (aiosmtpd wants a non-empty mail_from before RCPT) and is "" when queued.
        if address != "<>" and (bad := _address_reply(address, envelope, "5.1.7", "sender")):
            return bad
        ip = peer_ip(session.peer)
        limited = ip is not None and not self._exempt(ip)
        if limited and ip is not None and not await self._gate.allow_message(client_key(ip)):
            self.refused += 1
            log.warning("client %s over client_message_rate_per_min", client_key(ip))
            return "450 4.7.1 Error: too many messages from your address, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            return "554 5.7.1 Access denied"
        if bad := _address_reply(address, envelope, "5.1.3", "recipient"):
            return bad
        if len(envelope.rcpt_tos) >= self._max_rcpts:
            return f"452 4.5.3 Error: too many recipients (max {self._max_rcpts})"
        if self.suppressed is not None:
            sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
            try:
                why = await self.suppressed(address, sender.rpartition("@")[2])
            except SubmitError as exc:  # the node could not answer: the client tries later
                return exc.smtp_reply()
            if why is not None:
                self.suppressed_refused += 1
                return f"550 5.7.1 <{_printable(address)}>: recipient suppressed ({why})"
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
        max_headers = self.limits.max_header_count
        if header_count(body, max_headers) > max_headers:
            self.refused += 1
            return f"552 5.3.4 Error: too many header fields (max {max_headers})"
        try:
            queue_id = await self._enqueue(session, envelope, body)
        except SubmitError as exc:
            self.refused += 1
            log.warning("refused message from %s: %s", session.peer, exc)
            return exc.smtp_reply()
        self.accepted += 1
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def _enqueue(self, session: Session, envelope: Envelope, body: bytes) -> str:
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        rcpts = tuple(envelope.rcpt_tos)
        utf8 = bool(getattr(envelope, "smtp_utf8", False))
        peer: Any = session.peer
        accepted = await self.intake.accept(
            Submission(
                mail_from=mail_from,
                rcpts=rcpts,
                body=body,
                idem=idempotency_key(mail_from, rcpts, body),
                client=str(peer[0]) if isinstance(peer, tuple) else str(peer),
                trace=lambda queue_id, now_ms: self._received(
                    session, queue_id, rcpts, now_ms, utf8
                ),
                dsn=envelope.enqueue_fields() if isinstance(envelope, DsnEnvelope) else {},
            )
        )
        return accepted.queue_id

    def _received(
        self, session: Session, queue_id: str, rcpts: Sequence[str], now_ms: int, utf8: bool
    ) -> bytes:
        peer: Any = session.peer
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        helo = "".join(c if c.isprintable() else "?" for c in session.host_name or "unknown")[:255]
        # RFC 3848 protocol types: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA; after MAIL
        # ... SMTPUTF8, RFC 6531's UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA
        proto = ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if session.ssl is not None else "")
        proto += "A" if session.authenticated else ""
        date = rfc5322_date(now_ms // 1000)
        rcpt = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ([{ip}])\r\n\tby {self._hostname} (mqnode) with {proto} "
            f"id {queue_id}{rcpt};\r\n\t{date}\r\n"
        ).encode("utf-8", "replace")

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's catch-all: log it, and never echo internals to the client."""
        if isinstance(error, TLSSetupException):
            log.warning("TLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS not available due to temporary reason"
        log.error("SMTP session error", exc_info=error)
        return "451 4.3.0 Error: internal error, try again later"


def _printable(text: str, limit: int = 200) -> str:
    """Text for a reply line: printable ASCII, bounded (an address may carry UTF-8)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


# aiosmtpd calls inspect.signature() on handle_EHLO for every connection (to tell its
# old 4-argument form from the 5-argument one); answering from a stored signature
# takes a third of the time.
SmtpIngress.handle_EHLO.__signature__ = inspect.signature(SmtpIngress.handle_EHLO)  # type: ignore[attr-defined]
