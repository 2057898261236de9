"""DeliveryAgent: one SMTP transaction with aiosmtplib, replies mapped to per-recipient outcomes.

2xx -> delivered, 5xx -> bounced, 4xx or any connection/protocol failure ->
deferred. Targets (MX hosts' addresses, or the relay host) are tried in order
until one accepts the connection and greets with 220; a transaction that got
as far as MAIL FROM is final for this attempt (Postfix does the same).

A host that refuses EHLO with a 5xx reply gets HELO (RFC 5321 3.2), and then
no extensions: no STARTTLS, SIZE, 8BITMIME, SMTPUTF8, DSN or PIPELINING.

STARTTLS is used whenever offered, opportunistically as Postfix's `may` level
does: no certificate check, and any protocol version and cipher the host
speaks, TLS 1.0 included (tls.py), since the alternative is plaintext.
If the handshake still fails (or STARTTLS is refused), the same host is tried
once more at once without STARTTLS, as Postfix does at `may`; this is logged.
Mail for a domain that requires TLS (`require_tls`) gets TLS 1.2 at least, a
certificate that must verify and name the MX host (Postfix's `verify`), and
no fallback: "not offered", a failed handshake or a bad certificate defers it.
A relay host with a login (`RelayAuth`, a target marked `secure`) gets
Postfix's `secure` level instead: STARTTLS is required (or, with
`implicit_tls`, TLS from connect: port 465, RFC 8314), the certificate must
verify against the configured CAs and name the host as configured, and only
then does the agent AUTH, once, with the first of CRAM-MD5, PLAIN and LOGIN
that the relay offers. No STARTTLS, a bad certificate, no AUTH offered or a
refused login defer the mail (Postfix's soft bounce for SASL failures): the
password never goes to a host that has not proved its name over TLS.

SIZE (RFC 1870): MAIL carries `SIZE=n` to a host that offers the extension,
and a message over the limit its EHLO announced bounces (5.3.4) without
being sent, as Postfix does.

SMTPUTF8 (RFC 6531): an envelope with a UTF-8 address (ingress accepts them)
goes as `MAIL FROM:<...> SMTPUTF8` with UTF-8 commands to a host that offers
the extension; a host that does not cannot take it, so its recipients bounce
with 5.6.7 without being offered (Postfix does the same). A body with 8-bit
bytes is declared `BODY=8BITMIME` to a host that offers it (RFC 6152); to
one that does not it goes as it is (no MIME downgrade).

PIPELINING (RFC 2920): to a host that offers it, MAIL, every RCPT and DATA
go in one write and their replies are read in order (pipelining.py: the
transport is lent to a reply reader for the transaction, since aiosmtplib
reads one reply per command); then the body and the final ".". One round
trip where a host without it takes two plus one per recipient. DATA goes
even when every RCPT was refused (the host refuses it; one that answers 354
anyway gets a bare "." and delivers nothing). A session whose replies did not
pair up (a timeout, a malformed or unread reply) is closed, not parked.

DSN (RFC 3461): a message whose client gave DSN parameters carries them to a
host that offers DSN (RET and ENVID on MAIL, NOTIFY and ORCPT on each RCPT);
`deliver` reports which recipients such a host took, for which that host now
answers the sender's NOTIFY=SUCCESS. Without DSN at the host the parameters
stay here, and the dispatcher reports success itself (`Action: relayed`).

Fencing: `Transaction.gate()` is called after the server's 354 and right
before the body and the final "." are written (one write, nothing awaited in
between). If it returns False (the dispatch lease was lost), the connection
is dropped without the final "." so the server discards the message, and
`LeaseLost` is raised: nothing may be recorded for this attempt.

Connections are reused: parked per target for `idle_s`, up to
`max_idle_per_target` sessions and `max_messages_per_connection` transactions
each, so a burst to one destination pays the connect, EHLO and STARTTLS once.
A transaction that ended with the reply to the final "." leaves the session
ready for the next MAIL (RFC 5321 4.1.1.4); one that stopped earlier (MAIL,
every RCPT or DATA refused) is reset with RSET before it is parked. The body
and the final "." leave in one write, right after the lease gate. A parked
session that turns out closed at MAIL (the host closed it just after our
liveness check) is replaced by a new connection once: nothing of the message
had been sent, and a lost session counts towards the destination's
suspension (delivery/feedback.py).

Recipients: at most `max_rcpts_per_transaction` per transaction (Postfix's
`smtp_destination_recipient_limit`, 50), the rest in more transactions of
the same attempt, over the same session. A recipient refused for the count
(`452 4.5.3`, or a 452 without an enhanced status code, RFC 5321
4.5.3.1.10) in a transaction that delivered to others is the host's
recipient limit: it goes again in the next transaction at once, as Postfix
does. Any other 452 (`4.2.2 mailbox full`, ...) is that recipient's deferral.

Addresses: an internationalized domain goes as A-labels to a host without
SMTPUTF8 when its local part is ASCII; only a UTF-8 local part needs the
extension. A message whose header fields are UTF-8 (RFC 6532) declares
SMTPUTF8 to a host that offers it.

How the session ended goes back with the results (`Attempt.contact`, for the
dispatcher's concurrency feedback, delivery/feedback.py): a transaction answered, a
host that greeted with a refusal (typically "421 too many connections from
you", a receiver's connection limit: alive, named as the host that answered,
its recipients deferred with its reply), a connection lost mid-transaction,
or no host reached.

Limits: `timeout_s` per SMTP command and for the connect.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib

from mqnode.delivery.feedback import Contact
from mqnode.delivery.pipelining import lend_transport
from mqnode.spool.addresses import ascii_form
from mqnode.spool.dsnparams import DsnRequest
from mqnode.spool.line_ends import NOT_CR_LF, crlf_line_ends
from mqnode.spool.model import Outcome, RecipientResult
from mqnode.tls import opportunistic_client_context, required_client_context

log = logging.getLogger(__name__)

SMTPUTF8_NOT_OFFERED = "5.6.7 SMTPUTF8 is required, but was not offered by the host"


class LeaseLost(Exception):
    """The dispatch lease ended during a transaction; the message was not completed."""


class _Stale(aiosmtplib.SMTPServerDisconnected):
    """A reused session's connection was gone at MAIL: nothing of the message was sent."""


class _HandshakeFailed(aiosmtplib.SMTPException):
    """STARTTLS was offered but refused or its handshake failed."""


_STRONG_TLS = frozenset({"TLSv1.2", "TLSv1.3"})
_RECIPIENT_LIMIT = re.compile(r"452(?:[ -](?![245]\.\d{1,3}\.\d{1,3}\b)|[ -]4\.5\.3\b|$)")


def recipient_limit_reply(reply: str) -> bool:
    """Whether a RCPT refusal is the host's limit on recipients per transaction (module
    docstring): 452 with 4.5.3, or 452 without an enhanced status code."""
    return _RECIPIENT_LIMIT.match(reply) is not None


def describe(exc: BaseException) -> str:
    """An SMTP failure as its reply text ("550 5.7.1 ..."), not aiosmtplib's tuple."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class Target:
    name: str  # for logs and DSN Remote-MTA; what a secure target's certificate must name
    address: str
    port: int
    secure: bool = False  # the relay host with a login: verified TLS, then AUTH


@dataclass(frozen=True)
class RelayAuth:
    """The login for a relay host, and the client TLS context that verifies it."""

    user: str
    password: str = field(repr=False)
    tls: ssl.SSLContext = field(repr=False)
    implicit_tls: bool = False  # TLS from the first byte (port 465, RFC 8314), not STARTTLS


class RelayLoginError(aiosmtplib.SMTPException):
    """The relay host cannot take our login safely (no STARTTLS, no AUTH) or refused it."""


def _outcome_for(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


def _refused(code: int) -> Outcome:
    """A command answered with anything but its success code: 5xx bounces, the rest
    (4xx, or a 2xx/3xx where it makes no sense) defers."""
    return Outcome.BOUNCED if 500 <= code < 600 else Outcome.DEFERRED


# What a CRLF-only body with no leading dots still has to be checked for: a CR not
# followed by LF, or a line that starts with a dot. One search; sre finds the "\r"
# prefix of both alternatives with a fast scan.
_CR_NOT_LF_OR_DOT_LINE = re.compile(rb"\r[^\n]|\r\n\.")
_DOT_AFTER_LF = re.compile(rb"\n\.")


def dot_stuff(body: bytes) -> bytes:
    """CRLF line endings, leading dots doubled, ending in CRLF (RFC 5321 4.5.2).

    Bare CRs and LFs are made CRLF, never sent alone: receivers that end DATA on a bare
    line end could otherwise be handed a second message (SMTP smuggling). Queued bodies
    nearly always have CRLF line ends already and no line that starts with a dot, so
    this first checks for that in two C scans and returns such a body as it is: there
    are as many CRs as LFs (counted among the CRs and LFs alone, which `translate`
    keeps), no CR is followed by anything but LF (so every LF follows a CR), and no
    CRLF by a dot. ~1.1 ms per MiB (counting CRs and LFs, then searching for each case
    apart, takes 1.6): at 1 MiB it is the largest single cost on the leader's event loop.
    """
    ends = body.translate(None, NOT_CR_LF)
    if (
        len(ends) == 2 * ends.count(b"\r")
        and not body.startswith(b".")
        and not body.endswith(b"\r")
        and _CR_NOT_LF_OR_DOT_LINE.search(body) is None
    ):
        return body if body.endswith(b"\r\n") else body + b"\r\n"
    return _rewrite(body)


def _rewrite(body: bytes) -> bytes:
    """`dot_stuff` of a body that needs some of it (each step only where needed)."""
    body = crlf_line_ends(body)
    if body.startswith(b"."):
        body = b"." + body
    if _DOT_AFTER_LF.search(body):
        body = body.replace(b"\n.", b"\n..")
    return body if body.endswith(b"\r\n") else body + b"\r\n"


@dataclass(frozen=True)
class Transaction:
    """What `deliver` sends: one message to the recipients of one destination."""

    targets: tuple[Target, ...]  # tried in order until one takes the transaction
    mail_from: str
    rcpts: tuple[tuple[int, str], ...]  # (index in the message, address)
    body: bytes
    gate: Callable[[], bool] = field(repr=False)  # the lease check before the final "."
    require_tls: bool = False
    dsn: DsnRequest | None = None  # the client's RFC 3461 parameters, if any
    # A site's shaping (delivery/shaping.py); 0 / None: the agent's own limits.
    max_rcpts: int = 0  # recipients per transaction
    max_uses: int = 0  # messages per connection
    connect_gate: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Attempt:
    """What `deliver` reports."""

    results: list[RecipientResult]
    host: str  # the host that answered, "" if none did
    contact: Contact  # how the session ended (delivery/feedback.py)
    dsn_passed: frozenset[int] = frozenset()  # delivered to a host that took the DSN request


@dataclass
class _Parked:
    client: aiosmtplib.SMTP
    tls: bool
    uses: int
    since_s: float
    strong_tls: bool = False  # TLS 1.2 or later: may carry mail that requires TLS


class DeliveryAgent:
    def __init__(
        self,
        helo_hostname: str,
        timeout_s: float = 30.0,
        idle_s: float = 10.0,
        max_idle_per_target: int = 4,
        max_messages_per_connection: int = 100,
        relay_auth: RelayAuth | None = None,
        max_rcpts_per_transaction: int = 50,
        required_tls: ssl.SSLContext | None = None,
    ) -> None:
        self._helo = helo_hostname
        self._max_rcpts = max_rcpts_per_transaction
        self._relay_auth = relay_auth
        self._timeout_s = timeout_s
        self._tls = opportunistic_client_context()
        # verifies the MX host's certificate (tls_required_ca_file, else the system's CAs)
        self._tls_required = required_tls or required_client_context()
        self._idle_s = idle_s
        self._max_idle = max_idle_per_target
        self._max_uses = max_messages_per_connection
        self._parked: dict[Target, list[_Parked]] = {}
        self.connects = 0

    async def close(self) -> None:
        parked, self._parked = self._parked, {}
        for sessions in parked.values():
            for p in sessions:
                await _close(p.client)

    def _take(self, target: Target, strong_tls: bool = False) -> _Parked | None:
        """A parked session to `target` (with TLS 1.2+ if `strong_tls`); stale ones closed."""
        now = asyncio.get_running_loop().time()
        sessions = self._parked.get(target, [])
        for p in [
            p for p in sessions if not p.client.is_connected or now - p.since_s >= self._idle_s
        ]:
            sessions.remove(p)
            p.client.close()
        for i in range(len(sessions) - 1, -1, -1):
            if sessions[i].strong_tls or not strong_tls:
                return sessions.pop(i)
        return None

    async def _park(self, target: Target, p: _Parked, reset: bool, max_uses: int = 0) -> None:
        sessions = self._parked.setdefault(target, [])
        if p.uses >= (max_uses or self._max_uses) or len(sessions) >= self._max_idle:
            await _close(p.client)
            return
        try:
            if reset:
                await p.client.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            p.client.close()
            return
        if len(sessions) >= self._max_idle:  # others parked while we waited for RSET
            await _close(p.client)
            return
        p.since_s = asyncio.get_running_loop().time()
        sessions.append(p)

    async def reap(self, everything: bool = False) -> None:
        """QUIT parked sessions idle for `idle_s` (all of them when `everything`)."""
        now = asyncio.get_running_loop().time()
        for target, sessions in list(self._parked.items()):
            keep = [p for p in sessions if not everything and now - p.since_s < self._idle_s]
            stale = [p for p in sessions if p not in keep]
            self._parked[target] = keep
            if not keep:
                del self._parked[target]
            for p in stale:
                await _close(p.client)

    async def _connect(self, target: Target, require_tls: bool = False) -> _Parked:
        """A new session: EHLO (HELO after a 5xx), STARTTLS when offered, AUTH for a secure
        relay. A failed opportunistic handshake gets one more connection without TLS."""
        auth = self._relay_auth if target.secure else None
        if auth is not None:
            return await self._open(target, auth.tls, auth, starttls=True)
        ctx = self._tls_required if require_tls else self._tls
        try:
            return await self._open(target, ctx, None, starttls=True)
        except _HandshakeFailed as exc:
            if require_tls:
                raise _HandshakeFailed(f"TLS is required but the handshake failed: {exc}") from exc
            log.info(
                "%s[%s]: TLS handshake failed (%s); delivering without TLS (opportunistic)",
                target.name,
                target.address,
                exc,
            )
            return await self._open(target, ctx, None, starttls=False)

    async def _open(
        self, target: Target, ctx: ssl.SSLContext, auth: RelayAuth | None, starttls: bool
    ) -> _Parked:
        implicit = auth is not None and auth.implicit_tls
        client = aiosmtplib.SMTP(
            hostname=target.address,
            port=target.port,
            timeout=self._timeout_s,
            local_hostname=self._helo,
            use_tls=implicit,
            start_tls=False,
            tls_context=ctx,
        )
        self.connects += 1
        try:
            await client.connect()
            await _greet(client)
            tls = implicit or (starttls and client.supports_extension("starttls"))
            if tls and not implicit:
                try:
                    # a secure target's certificate must name the relay host as configured
                    await client.starttls(server_hostname=target.name)
                except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
                    raise _HandshakeFailed(describe(exc)) from exc
                await _greet(client)
            if auth is not None:
                await _log_in(client, target, auth, tls)
        except BaseException:
            client.close()
            raise
        return _Parked(client, tls, 0, 0.0, tls and _tls_version(client) in _STRONG_TLS)

    async def deliver(self, tx: Transaction) -> Attempt:
        """Send `tx` in transactions of at most `max_rcpts_per_transaction` recipients
        (module doc), over the first target that takes them."""
        results: list[RecipientResult] = []
        host = ""
        todo = list(tx.rcpts)
        passed: set[int] = set()
        per = tx.max_rcpts or self._max_rcpts
        while todo:
            batch, todo = todo[:per], todo[per:]
            part, host, contact, dsn_taken = await self._deliver_one(tx, batch)
            if contact is not Contact.ANSWERED:  # the rest would fare the same
                reply = part[0][2]
                rest = [(i, Outcome.DEFERRED.value, reply) for i, _ in todo]
                return Attempt(results + part + rest, host, contact, frozenset(passed))
            if dsn_taken:
                passed.update(i for i, out, _ in part if out == Outcome.DELIVERED.value)
            over = {
                i
                for i, out, reply in part
                if out == Outcome.DEFERRED.value and recipient_limit_reply(reply)
            }
            if over and any(out == Outcome.DELIVERED.value for _, out, _ in part):
                todo = [r for r in batch if r[0] in over] + todo  # the host's limit: again now
                part = [r for r in part if r[0] not in over]
                passed.difference_update(over)
            results += part
        return Attempt(results, host, Contact.ANSWERED, frozenset(passed))

    async def _deliver_one(
        self, tx: Transaction, rcpts: list[tuple[int, str]]
    ) -> tuple[list[RecipientResult], str, Contact, bool]:
        """One transaction for `rcpts` on the first target that takes it: the results, the
        name of the host that answered ("" if none did: every target refused, timed out or
        never greeted; a host that greeted with 421 counts as answering), how the session
        ended, and whether the host took `tx.dsn`'s parameters."""
        last_error = "no delivery target"
        answered = ""  # a host that greeted with a refusal: alive, only busy
        without_tls = False  # a host that answered but cannot take mail that requires TLS
        tries = [(target, True) for target in tx.targets]  # (target, may reuse a session)
        while tries:
            target, reuse = tries.pop(0)
            session = self._take(target, tx.require_tls) if reuse else None
            reused = session is not None
            if session is None:
                if tx.connect_gate is not None:
                    await tx.connect_gate()
                try:
                    session = await self._connect(target, tx.require_tls)
                except aiosmtplib.SMTPConnectResponseError as exc:
                    # "421 too many connections": busy, not unreachable (delivery/feedback.py).
                    last_error = f"{target.name}[{target.address}]: {exc.code} {exc.message}"
                    answered = answered or target.name
                    continue
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    last_error = f"{target.name}[{target.address}]: {describe(exc)}"
                    without_tls = without_tls or isinstance(exc, _HandshakeFailed)
                    continue
            if tx.require_tls and not session.strong_tls:
                last_error = f"{target.name}: TLS is required but not offered"
                if session.tls:
                    last_error = f"{target.name}: TLS is required, but the host has only TLS < 1.2"
                without_tls = True
                await _close(session.client)
                continue
            try:
                session.uses += 1
                dsn_taken = bool(tx.dsn) and session.client.supports_extension("dsn")
                dsn = tx.dsn if dsn_taken else None
                results, ended = await self._transaction(session.client, tx, rcpts, dsn)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await _close(session.client)
                if reused and isinstance(exc, _Stale):
                    # Closed by the host while parked, after our liveness check: once
                    # more on a new connection (a lost session counts towards suspension).
                    tries.insert(0, (target, False))
                    continue
                reply = f"{target.name}[{target.address}]: lost connection: {describe(exc)}"
                out = Outcome.DEFERRED.value
                return [(i, out, reply) for i, _ in rcpts], target.name, Contact.LOST, False
            except BaseException:
                session.client.close()
                raise
            await self._park(target, session, reset=not ended, max_uses=tx.max_uses)
            return results, target.name, Contact.ANSWERED, dsn_taken
        if without_tls:
            contact = Contact.NO_FEEDBACK
        else:
            contact = Contact.BUSY if answered else Contact.UNREACHABLE
        return [(i, Outcome.DEFERRED.value, last_error) for i, _ in rcpts], answered, contact, False

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        tx: Transaction,
        rcpts: list[tuple[int, str]],
        dsn: DsnRequest | None,
    ) -> tuple[list[RecipientResult], bool]:
        """Per-recipient results, and whether the transaction ended (final "." answered).

        `dsn`: the client's RFC 3461 parameters, for a host that offers DSN."""
        body = tx.body
        offered = client.supports_extension("smtputf8")
        mail_from, sent = _envelope_for(tx.mail_from, rcpts, offered)
        utf8 = not (mail_from.isascii() and all(addr.isascii() for _, addr in sent))
        if utf8 and not offered:
            out = Outcome.BOUNCED.value
            return [(i, out, SMTPUTF8_NOT_OFFERED) for i, _ in rcpts], False
        # RFC 6532 header fields need SMTPUTF8 where the host offers it.
        utf8 = utf8 or (offered and not _header_block(body).isascii())
        limit = _size_limit(client)
        if limit is not None and len(body) > limit:
            # Postfix's answer too (a bounce): the host said up front it takes no more.
            reply = f"552 5.3.4 message size {len(body)} exceeds the server's size limit {limit}"
            return [(i, Outcome.BOUNCED.value, reply) for i, _ in rcpts], False
        options, encoding = (["SMTPUTF8"], "utf-8") if utf8 else ([], "ascii")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(body)}")  # RFC 1870: it may refuse at MAIL, not after DATA
        if not body.isascii() and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")  # RFC 6152: declare 8-bit content where offered
        if dsn is not None:
            options += dsn.mail_options()
        # MAIL and RCPT are written as they are: the addresses were checked at ingress, and
        # aiosmtplib's mail()/rcpt() re-parse each with email.utils.
        mail_args = [b"FROM:<" + mail_from.encode(encoding) + b">", *(o.encode() for o in options)]
        rcpt_args = [
            [
                b"TO:<" + addr.encode(encoding) + b">",
                *(o.encode() for o in (dsn.rcpt_options(idx) if dsn is not None else [])),
            ]
            for idx, addr in sent
        ]
        if client.supports_extension("pipelining"):
            return await self._pipelined(client, mail_args, rcpt_args, rcpts, body, tx.gate)
        try:
            resp = await client.execute_command(b"MAIL", *mail_args)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _Stale(str(exc)) from exc
        if resp.code != 250:
            out = _refused(resp.code).value
            return [(i, out, f"MAIL: {resp.code} {resp.message}") for i, _ in rcpts], False
        results: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        for (idx, _addr), args in zip(sent, rcpt_args, strict=True):
            resp = await client.execute_command(b"RCPT", *args)
            if resp.code in (250, 251):
                accepted.append(idx)
            else:
                results[idx] = (idx, _refused(resp.code).value, f"{resp.code} {resp.message}")
        ended = False
        if accepted:
            outcome, reply, ended = await self._gated_data(client, body, tx.gate)
            for idx in accepted:
                results[idx] = (idx, outcome.value, reply)
        return [results[i] for i, _ in rcpts], ended

    async def _pipelined(
        self,
        client: aiosmtplib.SMTP,
        mail_args: list[bytes],
        rcpt_args: list[list[bytes]],
        rcpts: list[tuple[int, str]],
        body: bytes,
        gate: Callable[[], bool],
    ) -> tuple[list[RecipientResult], bool]:
        """MAIL, every RCPT and DATA in one write, their replies read in order (RFC 2920),
        then the body; as `_transaction` otherwise. DATA goes even when every RCPT was
        refused (the host then refuses DATA; a host that answers 354 anyway gets a bare
        "." and delivers nothing)."""
        commands = [_line(b"MAIL", mail_args), *(_line(b"RCPT", a) for a in rcpt_args)]
        timeout = self._timeout_s
        with lend_transport(client) as (transport, replies):
            transport.writelines([*commands, b"DATA\r\n"])
            try:
                mail = await replies.read(timeout)
            except aiosmtplib.SMTPServerDisconnected as exc:
                raise _Stale(str(exc)) from exc  # a parked session the host had closed
            try:
                answers = [await replies.read(timeout) for _ in rcpt_args]
                data = await replies.read(timeout)
            except aiosmtplib.SMTPServerDisconnected:
                if mail.code == 250:
                    raise
                out = _refused(mail.code).value  # "421 closing" to MAIL, then gone
                return [(i, out, f"MAIL: {mail.code} {mail.message}") for i, _ in rcpts], False
            results: dict[int, RecipientResult] = {}
            accepted: list[int] = []
            for (idx, _addr), resp in zip(rcpts, answers, strict=True):
                if mail.code != 250:
                    out = _refused(mail.code).value
                    results[idx] = (idx, out, f"MAIL: {mail.code} {mail.message}")
                elif resp.code in (250, 251):
                    accepted.append(idx)
                else:
                    results[idx] = (idx, _refused(resp.code).value, f"{resp.code} {resp.message}")
            if data.code != 354:
                outcome, reply, ended = (
                    _refused(data.code),
                    f"DATA: {data.code} {data.message}",
                    False,
                )
            elif not accepted:
                transport.write(b".\r\n")  # nothing to deliver: end the empty message
                await replies.read(timeout)
                return [results[i] for i, _ in rcpts], True
            elif not gate():
                raise LeaseLost("dispatch lease lost before the end of DATA")  # no "."
            else:
                transport.writelines([dot_stuff(body), b".\r\n"])
                final = await replies.read(timeout)
                outcome, reply, ended = (
                    _outcome_for(final.code),
                    f"{final.code} {final.message}",
                    True,
                )
            for idx in accepted:
                results[idx] = (idx, outcome.value, reply)
            return [results[i] for i, _ in rcpts], ended

    async def _gated_data(
        self, client: aiosmtplib.SMTP, body: bytes, gate: Callable[[], bool]
    ) -> tuple[Outcome, str, bool]:
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            return _refused(start.code), f"DATA: {start.code} {start.message}", False
        protocol = client.protocol
        assert protocol is not None
        if not gate():
            client.close()  # no final ".": the server must discard the message
            raise LeaseLost("dispatch lease lost before the end of DATA")
        # Body and final "." in one write, with no await between the gate and it; a
        # gathered write (writev), not a copy of the body with the dot joined on.
        transport = cast(asyncio.WriteTransport | None, protocol.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        transport.writelines([dot_stuff(body), b".\r\n"])
        resp = await protocol.read_response(timeout=self._timeout_s)
        return _outcome_for(resp.code), f"{resp.code} {resp.message}", True


def _line(command: bytes, args: list[bytes]) -> bytes:
    """A command line as aiosmtplib's execute_command writes it."""
    return b" ".join([command, *args]) + b"\r\n"


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO; HELO when the host refuses EHLO with a 5xx (RFC 5321 3.2): no extensions."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not 500 <= exc.code < 600:
            raise
        await client.helo()


def _tls_version(client: aiosmtplib.SMTP) -> str | None:
    transport = client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return None if ssl_object is None else ssl_object.version()


def _envelope_for(
    mail_from: str, rcpts: list[tuple[int, str]], smtputf8: bool
) -> tuple[str, list[tuple[int, str]]]:
    """The addresses as sent: as stored to a host with SMTPUTF8, else their ASCII forms
    (A-label domains) where the local part is ASCII (a UTF-8 one stays and bounces)."""
    if smtputf8:
        return mail_from, rcpts

    def ascii_or_same(addr: str) -> str:
        return addr if addr.isascii() else (ascii_form(addr) or addr)

    return ascii_or_same(mail_from), [(i, ascii_or_same(a)) for i, a in rcpts]


def _header_block(body: bytes) -> bytes:
    ends = [e for e in (body.find(b"\r\n\r\n"), body.find(b"\n\n")) if e >= 0]
    return body[: min(ends)] if ends else body


def _size_limit(client: aiosmtplib.SMTP) -> int | None:
    """The SIZE the host announced in its EHLO (RFC 1870), None if none or unlimited (0)."""
    value = client.esmtp_extensions.get("size", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


async def _log_in(client: aiosmtplib.SMTP, target: Target, auth: RelayAuth, tls: bool) -> None:
    if not tls:
        raise RelayLoginError(
            f"{target.name} does not offer STARTTLS; mqnode logs in to a relay only over TLS"
        )
    offered = client.supported_auth_methods  # ours that it offers, aiosmtplib's order
    if not offered:
        raise RelayLoginError(f"{target.name} offers no AUTH mechanism we speak over TLS")
    # One mechanism, one try: aiosmtplib's login() tries the next one after a refusal,
    # which counts twice against a relay's failed-login limits.
    mechanism = {"cram-md5": client.auth_crammd5, "plain": client.auth_plain}.get(
        offered[0], client.auth_login
    )
    try:
        await mechanism(auth.user, auth.password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise RelayLoginError(
            f"{target.name} refused the login of {auth.user!r}: {exc.code} {exc.message}"
        ) from exc


async def _close(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
