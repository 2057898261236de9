"""SubmissionProtocol: aiosmtpd's SMTP session with mqnode's limits, TLS and AUTH.

One instance per connection, built by the listener with the node's
`SmtpIngress` (the handler, which decides policy). This module and smtp/handler.py
together are the aiosmtpd adapter: smtp/handler.py holds the handler hooks,
this one the session mechanics aiosmtpd has no hooks for. It relies on
aiosmtpd 1.4's protected attributes (`_smtp_methods`, `_handle_client`,
`_timeout_cb`, `_tls_protocol`), which the `<2` pin in pyproject.toml keeps.

Contract, per connection:
* Per-client limits are checked before the greeting: over the connection
  rate or the concurrent-connection cap, the client gets `421 4.7.0` instead
  of `220` and the connection closes.
* STARTTLS is offered on the submission port when a TLS context is
  configured; AUTH PLAIN and LOGIN only once the session is encrypted
  (STARTTLS, or the implicit-TLS port of RFC 8314), and only when a users
  file is configured. AUTH before TLS gets `538 5.7.11`; a wrong password
  `535 5.7.8`; `max_auth_failures` wrong passwords in one session `421 4.7.0`
  and close. Password checks run in a thread (scrypt is CPU-bound).
* At most `max_commands_per_session` commands (recognised ones; aiosmtpd
  drops a client after 5 unrecognised ones), then `421 4.7.0` and close.
* Idle timeout `idle_timeout_s`: no command (or, inside DATA, no bytes) for
  that long gets `421 4.4.2` and close. Time spent in the handler (waiting
  for a Raft commit) or checking a password never counts as idle.
* DSN parameters (RFC 3461, spool/dsnparams.py) are taken out of MAIL and RCPT
  before aiosmtpd parses the rest; a malformed one gets `501 5.5.4` and the
  command is not handed to the handler.
* aiosmtpd's bare replies for over-long lines and oversized DATA get enhanced
  status codes (`500 5.5.2`, `552 5.3.4`); no reply ever fails to encode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import re
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

from mqnode.smtp.data import NOMINAL, TOO_LONG, TOO_MUCH, read_data
from mqnode.smtp.handler import DsnEnvelope, SmtpIngress, hook_names
from mqnode.spool.dsnparams import (
    DsnParamError,
    mail_params,
    rcpt_params,
    split_params,
    without_dsn,
)

# aiosmtpd's replies without an enhanced status code (RFC 3463) -> ours.
_ENHANCED = {
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": (
        "500 5.5.2 Error: line too long (max 1000 bytes, RFC 5321 4.5.3.1.6)"
    ),
    "552 Error: Too much mail data": "552 5.3.4 Error: message too big",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
}

Method = Callable[[Any], Awaitable[None]]

_DATA_REFUSALS = {
    TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    TOO_MUCH: "552 Error: Too much mail data",
}

# `<local@domain>` with both parts dot-atoms of RFC 5322 atext: the common case, for
# which email's header parser (aiosmtpd's _getaddr) gives exactly the address as
# written and the rest with leading blanks stripped. Anything else goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE_PATH = re.compile(rf"[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>[ \t]*(.*)", re.DOTALL)


class _CountedMethods(dict[str, Callable[..., Awaitable[None]]]):
    """aiosmtpd's command table for one session, shared per class, bound when looked up.

    aiosmtpd binds all twenty-odd `smtp_*` methods of every new connection
    (and wrapping them in the command counter would cost twenty closures);
    a session uses four or five. `get` binds the one asked for and wraps it.
    HELP reads the functions' syntax attributes through `items()`.
    """

    def __init__(self, session: SubmissionProtocol) -> None:
        super().__init__(_command_functions(type(session)))
        self._session = session

    def get(self, name: str, default: Any = None) -> Any:
        func = super().get(name)
        if func is None:
            return default
        return _Counted(self._session, name, func.__get__(self._session, type(self._session)))


class _Counted:
    """One looked-up command: counts it against the session's limit, then runs it.

    A small object rather than a closure dressed by functools.update_wrapper
    (which copied five attributes and a dict per SMTP command); HELP reads the
    command's syntax attributes through `__getattr__`.
    """

    __slots__ = ("_method", "_name", "_session")

    def __init__(self, session: SubmissionProtocol, name: str, method: Method) -> None:
        self._session = session
        self._name = name
        self._method = method

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._method, attr)

    async def __call__(self, arg: Any) -> None:
        session = self._session
        if session._closing:
            return
        session._commands += 1
        if session._commands > session._ingress.limits.max_commands_per_session:
            await session._close_with(
                f"421 4.7.0 {session.hostname} Error: too many commands in this session"
            )
            return
        session._in_data = self._name == "DATA"
        try:
            await self._method(arg)
        finally:
            session._in_data = False


def _command_functions(cls: type) -> dict[str, Callable[..., Awaitable[None]]]:
    """SMTP verb -> the class's `smtp_<VERB>` function (what aiosmtpd's table holds, unbound)."""
    table: dict[str, Callable[..., Awaitable[None]]] | None = cls.__dict__.get("_mq_commands")
    if table is None:
        table = {n.removeprefix("smtp_"): getattr(cls, n) for n in hook_names(cls, ("smtp_",))}
        cls._mq_commands = table  # type: ignore[attr-defined]
    return table


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # built outside a loop (tests): aiosmtpd finds one


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        return None


class SubmissionProtocol(SMTP):
    """One SMTP connection; see the module docstring for the limits it applies."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, ingress: SmtpIngress, implicit_tls: bool = False) -> None:
        lim = ingress.limits
        super().__init__(
            ingress,
            data_size_limit=lim.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=ingress.hostname,
            ident="mqnode",
            # On the implicit-TLS port the whole connection is encrypted already.
            tls_context=None if implicit_tls else ingress.tls,
            auth_require_tls=not implicit_tls,
            timeout=lim.idle_timeout_s,
            auth_exclude_mechanism=[] if ingress.users is not None else ["PLAIN", "LOGIN"],
            # aiosmtpd's own lookup (get_event_loop with fallbacks) cost 2% of the leader.
            loop=_running_loop(),
        )
        # aiosmtpd keeps these in a class attribute that every EHLO grows and every new
        # connection clears; a per-session copy keeps sessions from sharing it.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._ingress = ingress
        self.implicit_tls = implicit_tls
        self._client_key: str | None = None
        self._closing = False
        self._busy = 0  # handler calls and password checks in progress: not idle
        self._in_data = False
        self._commands = 0
        self._failed_logins = 0
        self._held_lines: list[bytes] = []
        self._idle_due = 0.0  # the idle deadline (loop time); see _reset_timeout
        self._idle_timer_at: float | None = None  # when the armed timer fires
        self._smtp_methods = _CountedMethods(self)
        self._dsn_given: dict[str, str] | str | None = None  # see _getaddr

    def __dir__(self) -> list[str]:
        # What aiosmtpd's __init__ scans: AUTH mechanisms (its command table, built
        # from smtp_* names, is replaced by _CountedMethods right after).
        return hook_names(type(self), ("auth_",))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser (`_parse_path`), the DSN parameters set aside
        for `_take_dsn` (what aiosmtpd sees is the rest)."""
        address, params = self._parse_path(arg)
        self._dsn_given = None
        if params and "=" in params:
            # RFC 3461's parameters, as sent: aiosmtpd upper-cases what it sees (ENVID and
            # ORCPT are case-sensitive) and refuses keywords it does not know.
            try:
                rest, dsn = split_params(params)
            except DsnParamError as exc:
                # Answered by our hook; aiosmtpd would say 555 "not recognized" first.
                params, self._dsn_given = without_dsn(params), str(exc)
            else:
                if dsn:
                    params, self._dsn_given = rest, dsn
        return address, params

    def _parse_path(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser with a fast path for plain `<local@domain>`.

        aiosmtpd runs email's full RFC 5322 parser (and defines a class) on every
        MAIL and RCPT: a tenth of the leader's CPU per message, measured with
        py-spy under smtp-source. Same answers (tests/unit/test_smtp_getaddr.py).
        """
        m = _SIMPLE_PATH.fullmatch(arg)
        if m is None or m.group(2).startswith("("):  # a comment after it: the parser's job
            try:
                return super()._getaddr(arg)
            except (AttributeError, IndexError, TypeError, ValueError):
                # email's parser crashes on some malformed paths ("<0@[@0>": AttributeError
                # in CPython 3.11, found by Hypothesis); that is a bad address, not a 500.
                return None, None
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, m.group(2)

    def _create_envelope(self) -> DsnEnvelope:
        return DsnEnvelope()

    def _take_dsn(self, command: str) -> tuple[str | None, tuple[str, str]]:
        """The DSN parameters `_getaddr` set aside for MAIL or RCPT, parsed: (the reply for
        a malformed one, else None; (RET, ENVID) or (NOTIFY, ORCPT))."""
        given, self._dsn_given = self._dsn_given, None
        if given is None:
            return None, ("", "")
        if isinstance(given, str):
            return given, ("", "")
        assert self.session is not None
        if not self.session.extended_smtp:
            return "501 5.5.4 Error: DSN parameters need EHLO", ("", "")
        try:
            return None, mail_params(given) if command == "MAIL" else rcpt_params(given)
        except DsnParamError as exc:
            return str(exc), ("", "")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the message read in pieces (smtp/data.py), not line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and not self._decode_data
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, verdict = await read_data(
                self._reader, self.data_size_limit, self.line_length_limit
            )
        except asyncio.IncompleteReadError:  # end of file inside DATA: nobody to answer
            self._writer.close()
            return
        except asyncio.CancelledError:  # the connection was lost inside DATA
            self._writer.close()
            raise
        if verdict != NOMINAL:  # aiosmtpd's own replies (push adds the enhanced codes)
            await self.push(_DATA_REFUSALS[verdict])
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    # --- connection accounting ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.session is not None
        if self.implicit_tls:
            self.session.ssl = {
                "cipher": transport.get_extra_info("cipher"),
                "ssl_object": transport.get_extra_info("ssl_object"),
            }

    def connection_lost(self, error: Exception | None) -> None:
        key, self._client_key = self._client_key, None
        if key is not None:
            self._ingress.close_connection(key)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session task on EOF; a task cancelled before its first
        # step never closes the connection, which then lingers until the idle timeout.
        super().eof_received()
        if self.transport is not None:
            self.transport.close()  # still sends the replies already written
        return False

    async def _handle_client(self) -> None:
        assert self.session is not None
        # Per-client limits before the greeting. A worker process asks its node, so the
        # answer can take a moment; a connection lost meanwhile cancels this task, and
        # the link gives back a slot granted too late (smtpworker.NodeLink).
        key, refusal = await self._ingress.open_connection(self.session.peer)
        if self.transport is None or self.transport.is_closing():
            if key is not None:
                self._ingress.close_connection(key)
            return
        self._client_key = key
        if refusal is not None:
            await self._close_with(refusal)  # instead of the 220 greeting
            return
        await super()._handle_client()

    async def _close_with(self, reply: str) -> None:
        """Send a final reply, stop reading, close."""
        if self._closing:
            return
        self._closing = True
        try:
            with suppress(ConnectionError):
                await self.push(reply)
        finally:
            if self.transport is not None:
                self.transport.close()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()

    # --- replies -----------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = _ENHANCED.get(status, status).encode("utf-8", "replace")
        if status[3:4] == b"-":
            # A continuation line (EHLO's list): hold it until the reply's last line,
            # so a multi-line reply leaves in one write, not one syscall per line.
            self._held_lines.append(status)
            return
        if self._held_lines:
            status = b"\r\n".join([*self._held_lines, status])
            self._held_lines.clear()
        await super().push(status)

    # --- idle time ------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; the armed timer re-arms itself when it fires early.

        aiosmtpd cancels and re-creates a timer on every command (a heap push and
        a cancelled handle each); with one message per connection that is eight
        timers per message for a deadline minutes away.
        """
        due = self.loop.time() + (duration or self._timeout_duration)
        self._idle_due = due
        if self._idle_timer_at is None or self._idle_timer_at > due:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._arm_idle_timer(due)

    def _arm_idle_timer(self, when: float) -> None:
        self._idle_timer_at = when
        self._timeout_handle = self.loop.call_at(when, self._idle_timer_fired)

    def _idle_timer_fired(self) -> None:
        self._idle_timer_at = None
        # (a millisecond of slack: event loops may run a timer a little early)
        if self._idle_due - self.loop.time() > 0.001:
            self._arm_idle_timer(self._idle_due)  # there was activity meanwhile
        else:
            self._timeout_cb()

    def _rearm(self) -> None:
        if self.transport is not None and not self._closing:
            self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        if self._in_data:  # a slow upload is not idle
            self._rearm()
        super().data_received(data)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        dsn = None
        if command in ("MAIL", "RCPT"):
            refusal, dsn = self._take_dsn(command)
            if refusal is not None:
                return refusal
        self._busy += 1
        try:
            status = await super()._call_handler_hook(command, *args)
        finally:
            self._busy -= 1
            self._rearm()
        envelope = self.envelope
        accepted = isinstance(status, str) and status[:3] == "250"
        if dsn is not None and accepted and isinstance(envelope, DsnEnvelope):
            if command == "MAIL":
                envelope.dsn_mail = dsn
            else:
                envelope.add_rcpt_dsn(dsn, len(envelope.rcpt_tos))
        return status

    def _timeout_cb(self) -> None:
        if self._busy:
            self._rearm()
            return
        if self.transport is None or self._closing:
            return
        self._closing = True
        # a TCP or TLS transport (uvloop's are not asyncio subclasses)
        cast(asyncio.WriteTransport, self.transport).write(
            f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode()
        )
        self.transport.close()

    # --- AUTH (replaces aiosmtpd's built-in PLAIN and LOGIN) ----------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob: Any
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):  # aborted; the reply is sent
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Error: cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:  # authzid NUL authcid NUL passwd (RFC 4616)
            await self.push("501 5.5.2 Error: cannot split the PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login: Any
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            login = _b64(args[1])
            if login is None:
                await self.push("501 5.5.2 Error: cannot decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        self._busy += 1
        try:
            user = await self._ingress.verify(login, password)
        finally:
            self._busy -= 1
            self._rearm()
        if user is not None:
            return AuthResult(success=True, auth_data=user)
        self._failed_logins += 1
        if self._failed_logins >= self._ingress.limits.max_auth_failures:
            await self._close_with(
                f"421 4.7.0 {self.hostname} Error: too many failed authentications"
            )
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Error: authentication failed"
        )
