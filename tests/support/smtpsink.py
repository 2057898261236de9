"""Scriptable recording SMTP sinks for delivery tests (in-process, aiosmtpd).

mqnode's devsink accepts everything and records only a summary line. Delivery
tests need more: refuse given recipients (550/451), answer DATA with 451 a
given number of times, answer slowly, and keep every byte that arrived so a
test can parse bounces and compare headers across attempts. That is this
module; it is test-only and imports nothing of mqnode.

    host = SinkHost()                       # one asyncio loop thread for all sinks
    port, socks = bind_common_port(["127.0.0.2", "127.0.0.3"])
    a = host.add("mx-a", socks["127.0.0.2"])
    a.script_rcpt("bad@perm.test", "550 5.1.1 <bad@perm.test>: user unknown")
    a.script_data("later@temp.test", "451 4.3.0 try again later", "250 2.0.0 Ok")
    host.start() ... host.stop()            # or `with SinkHost() as host:`

Scripts: a recipient's replies are used in order and the last one repeats, so
("451 ...", "250 ...") fails once then accepts; ("550 ...",) always refuses.
The address "*" scripts every recipient without a script of its own; a
recipient without any script gets 250. The DATA reply of a transaction is the
script of its first accepted recipient that has one (else 250).

What is recorded, in arrival order, under one lock:
    `rcpts`   every RCPT (sink, EHLO name, MAIL FROM, address, reply given)
              (the null reverse path "MAIL FROM:<>" is recorded as "")
    `datas`   every completed DATA (final "." received): envelope, the bytes
              as received (dot-unstuffed, CRLF), the reply given, Message-ID
A DATA is recorded when its final "." arrives, *before* the (possibly
delayed, `reply_delay_s`) reply is written: like a real MTA that commits the
message and then answers, so a client that dies while waiting for the reply
leaves a message that was delivered although the client never learnt it.
`in_progress` counts transactions between their final "." and their reply
(`most_in_progress`: the most at once so far);
`connections`, `open_connections` and `quits` count TCP connections accepted,
still open, and QUIT commands. With `max_connections` a connection beyond that
many open is greeted "421 4.7.0 Error: too many connections" and closed, as
Postfix's smtpd_client_connection_count_limit does (`busy_refusals` counts
them; `most_open_connections` is the most served at once). With a
`tls_context` the sink offers STARTTLS (`self_signed_tls` makes one) and
`DataEvent.tls` says whether it was used.
A transaction whose connection drops before the final "." records nothing.

Every loop is bounded: the serving thread ends at `stop()` or after
`max_lifetime_s`, whichever comes first; `stop()` closes every connection.
Loopback only (`bind_common_port` refuses other addresses).
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

START_TIMEOUT_S = 10.0
# Longer than any test: a connection a client leaves open stays visibly open.
IDLE_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
_BIND_ATTEMPTS = 50


@dataclass(frozen=True)
class RcptEvent:
    sink: str
    helo: str
    mail_from: str
    address: str
    reply: str


@dataclass(frozen=True)
class DataEvent:
    sink: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    content: bytes
    reply: str
    message_id: str
    at_s: float  # time.monotonic() when the final "." arrived
    tls: bool  # the transaction ran after a successful STARTTLS
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters (BODY=8BITMIME, SMTPUTF8)
    auth_user: str = ""  # the login of an authenticated session (sinks with `users`)

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")


def message_id_of(content: bytes) -> str:
    value = BytesHeaderParser().parsebytes(content).get("Message-ID", "")
    return " ".join(str(value).split())


def self_signed_tls(
    directory: Path, name: str = "sink.test", also: Sequence[str] = ()
) -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed EC certificate for `name` (and
    the names in `also`); the certificate is `directory / f"{name}.crt"`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in (name, *also)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _reverse_path(mail_from: str | None) -> str:
    """aiosmtpd keeps "MAIL FROM:<>" as "<>"; record the null sender as ""."""
    value = (mail_from or "").strip()
    return "" if value in ("", "<>") else value


def bind_common_port(hosts: Sequence[str]) -> tuple[int, dict[str, socket.socket]]:
    """One TCP port that is free on every host; the listening sockets, bound and listening.

    The sockets are handed to `SinkHost.add`, so no other process can take the
    port between choosing it and serving on it.
    """
    for host in hosts:
        if not host.startswith("127."):
            raise ValueError(f"sinks listen on 127.0.0.0/8 only, not {host}")
    last: OSError | None = None
    for _ in range(_BIND_ATTEMPTS):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        finally:
            probe.close()
        socks: dict[str, socket.socket] = {}
        try:
            for host in hosts:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks[host] = s
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(64)
                s.setblocking(False)
        except OSError as exc:
            last = exc
            for s in socks.values():
                s.close()
            continue
        return port, socks
    raise OSError(f"no port free on all of {list(hosts)}: {last}")


class Sink:
    """One listening address: its scripts and what it received. Thread-safe."""

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        reply_delay_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
        rcpt_delay_s: float = 0.0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        smtputf8: bool = False,
        users: dict[str, str] | None = None,
        data_size_limit: int = 64 * 1024 * 1024,
        max_rcpts: int = 0,
        dsn: bool = False,
        max_connections: int = 0,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.max_connections = max_connections
        self.busy_refusals = 0
        self.most_open_connections = 0
        self._params: list[tuple[str, str]] = []  # (path, parameters as sent), with dsn
        self.data_size_limit = data_size_limit
        self.max_rcpts = max_rcpts
        self.smtputf8 = smtputf8
        self.users = users
        self._auth_attempts: list[tuple[str, bool, bool]] = []  # (login, ok, over TLS)
        self.idle_timeout_s = idle_timeout_s
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()
        self.reply_delay_s = reply_delay_s
        self.rcpt_delay_s = rcpt_delay_s
        self.tls_context = tls_context
        self._lock = threading.Lock()
        self._rcpt_scripts: dict[str, list[str]] = {}
        self._data_scripts: dict[str, list[str]] = {}
        self._rcpts: list[RcptEvent] = []
        self._datas: list[DataEvent] = []
        self.connections = 0  # accepted so far
        self.open_connections = 0  # not yet closed (by either side)
        self.quits = 0
        self._in_progress = 0
        self._most_in_progress = 0
        self._rcpt_in_progress = 0

    # -- configuration ------------------------------------------------------------

    def script_rcpt(self, address: str, *replies: str) -> None:
        with self._lock:
            self._rcpt_scripts[address.lower()] = list(replies)

    def script_data(self, address: str, *replies: str) -> None:
        with self._lock:
            self._data_scripts[address.lower()] = list(replies)

    # -- observation ----------------------------------------------------------------

    @property
    def params(self) -> list[tuple[str, str]]:
        """With `dsn`: every MAIL and RCPT path and its parameters, as sent."""
        with self._lock:
            return list(self._params)

    def _on_params(self, path: str, params: str) -> None:
        with self._lock:
            self._params.append((path, params))

    @property
    def rcpts(self) -> list[RcptEvent]:
        with self._lock:
            return list(self._rcpts)

    @property
    def datas(self) -> list[DataEvent]:
        with self._lock:
            return list(self._datas)

    @property
    def in_progress(self) -> int:
        """Transactions whose final "." arrived and whose reply is not yet written."""
        with self._lock:
            return self._in_progress

    @property
    def most_in_progress(self) -> int:
        with self._lock:
            return self._most_in_progress

    @property
    def rcpt_in_progress(self) -> int:
        """RCPT commands received and not yet answered (only with `rcpt_delay_s`)."""
        with self._lock:
            return self._rcpt_in_progress

    @property
    def auth_attempts(self) -> list[tuple[str, bool, bool]]:
        """Every AUTH that reached the authenticator: (login, accepted, over TLS)."""
        with self._lock:
            return list(self._auth_attempts)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        login = bytes(getattr(data, "login", b"") or b"").decode("utf-8", "replace")
        password = bytes(getattr(data, "password", b"") or b"").decode("utf-8", "replace")
        ok = self.users is not None and self.users.get(login) == password
        with self._lock:
            self._auth_attempts.append((login, ok, session.ssl is not None))
        # handled=False: aiosmtpd then answers a failure with 535 itself
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)

    def _rcpt_wait(self, delta: int) -> None:
        with self._lock:
            self._rcpt_in_progress += delta

    def delivered(self) -> list[DataEvent]:
        """DATA transactions this sink accepted (2xx)."""
        return [d for d in self.datas if d.accepted]

    # -- called on the sink loop ------------------------------------------------------

    @staticmethod
    def _next(scripts: dict[str, list[str]], key: str) -> str | None:
        script = scripts.get(key, scripts.get("*"))
        if not script:
            return None
        return script.pop(0) if len(script) > 1 else script[0]

    def _on_rcpt(self, session: Session, envelope: Envelope, address: str) -> str:
        with self._lock:
            reply = self._next(self._rcpt_scripts, address.lower()) or "250 2.1.5 Ok"
            if self.max_rcpts and len(envelope.rcpt_tos) >= self.max_rcpts:
                reply = "452 4.5.3 Too many recipients"
            self._rcpts.append(
                RcptEvent(
                    self.name,
                    session.host_name or "",
                    _reverse_path(envelope.mail_from),
                    address,
                    reply,
                )
            )
        return reply

    def _on_data(self, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        with self._lock:
            reply = "250 2.0.0 Ok: recorded"
            for rcpt in envelope.rcpt_tos:
                scripted = self._next(self._data_scripts, rcpt.lower())
                if scripted is not None:
                    reply = scripted
                    break
            self._datas.append(
                DataEvent(
                    self.name,
                    session.host_name or "",
                    _reverse_path(envelope.mail_from),
                    tuple(envelope.rcpt_tos),
                    content,
                    reply,
                    message_id_of(content),
                    time.monotonic(),
                    session.ssl is not None,
                    tuple(envelope.mail_options),
                    str(session.auth_data or "") if session.authenticated else "",
                )
            )
            self._in_progress += 1
            self._most_in_progress = max(self._most_in_progress, self._in_progress)
        return reply

    def _reply_sent(self) -> None:
        with self._lock:
            self._in_progress -= 1

    def _connected(self) -> bool:
        """Count a new connection; False if it is one too many (`max_connections`)."""
        with self._lock:
            if self.max_connections and self.open_connections >= self.max_connections:
                self.busy_refusals += 1
                return False
            self.connections += 1
            self.open_connections += 1
            self.most_open_connections = max(self.most_open_connections, self.open_connections)
            return True

    def _disconnected(self) -> None:
        with self._lock:
            self.open_connections -= 1

    def _quit(self) -> None:
        with self._lock:
            self.quits += 1


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._sink.rcpt_delay_s > 0:
            self._sink._rcpt_wait(+1)
            try:
                await asyncio.sleep(self._sink.rcpt_delay_s)
            finally:
                self._sink._rcpt_wait(-1)
        reply = self._sink._on_rcpt(session, envelope, address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self._sink.dsn:
            return [*responses[:-1], "250-DSN", responses[-1]]
        return responses

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink._quit()
        return "221 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._sink._on_data(session, envelope)  # recorded before the reply
        try:
            if self._sink.reply_delay_s > 0:
                await asyncio.sleep(self._sink.reply_delay_s)
        finally:
            self._sink._reply_sent()
        return reply


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP that counts connections and remembers its transport for stop().

    After STARTTLS aiosmtpd calls connection_made again with the TLS transport;
    only the first call (the TCP connection) is counted and remembered.
    """

    def __init__(self, sink: Sink, host: SinkHost, **kw: Any) -> None:
        super().__init__(_Handler(sink), **kw)
        self._sink = sink
        self._host = host
        self._tcp: asyncio.BaseTransport | None = None
        self._busy = False  # refused at the greeting: aiosmtpd never ran

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tcp is None:
            if not self._sink._connected():
                self._busy = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 Error: too many connections from you\r\n")
                transport.close()
                return
            self._tcp = transport
            self._host._transports.add(transport)
        super().connection_made(transport)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """With `dsn`: record the parameters as sent, and keep RFC 3461's from aiosmtpd
        (which refuses keywords it does not know)."""
        address, params = super()._getaddr(arg)
        if not self._sink.dsn or address is None:
            return address, params
        self._sink._on_params(address, params or "")
        dsn = ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")
        kept = [p for p in (params or "").split() if not p.upper().startswith(dsn)]
        return address, " ".join(kept)

    def connection_lost(self, error: Exception | None) -> None:
        if self._busy:
            return
        if self._tcp is not None:
            self._host._transports.discard(self._tcp)
            self._sink._disconnected()
        super().connection_lost(error)


class SinkHost:
    """One asyncio loop on a thread serving every added sink."""

    def __init__(self, max_lifetime_s: float = 600.0) -> None:
        self._max_lifetime_s = max_lifetime_s
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._sinks: list[Sink] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: set[asyncio.BaseTransport] = set()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def add(
        self,
        name: str,
        sock: socket.socket,
        reply_delay_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
        rcpt_delay_s: float = 0.0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        smtputf8: bool = False,
        users: dict[str, str] | None = None,
        data_size_limit: int = 64 * 1024 * 1024,
        max_rcpts: int = 0,
        dsn: bool = False,
        max_connections: int = 0,
    ) -> Sink:
        """A sink serving on `sock` (bound and listening); served once started.

        `reply_delay_s` delays the reply to the final "." (the message is
        recorded first); `rcpt_delay_s` delays every RCPT reply (a client is
        then stuck before DATA). With `tls_context` it offers STARTTLS
        (opportunistic: not required). A connection idle for `idle_timeout_s`
        is closed by the sink (without a 421), as servers do. `smtputf8` offers
        SMTPUTF8 (RFC 6531): UTF-8 addresses are accepted only then. `users`
        (login -> password) makes it a relay that requires AUTH PLAIN/LOGIN, only
        after STARTTLS, before MAIL (530 otherwise). `data_size_limit` is the SIZE
        its EHLO announces and enforces. `max_rcpts` (0: none) answers RCPTs past that
        many accepted in one transaction "452 4.5.3 Too many recipients". `dsn` offers
        DSN (RFC 3461) and records each MAIL and RCPT's parameters (`params`).
        `max_connections` (0: none) greets connections past that many open with 421.
        """
        sink = Sink(
            name,
            sock,
            reply_delay_s,
            tls_context,
            rcpt_delay_s,
            idle_timeout_s,
            smtputf8,
            users,
            data_size_limit,
            max_rcpts,
            dsn,
            max_connections,
        )
        self._sinks.append(sink)
        if self._thread is not None:
            fut = asyncio.run_coroutine_threadsafe(self._serve_one(sink), self._loop)
            fut.result(timeout=START_TIMEOUT_S)
        return sink

    def all_datas(self, sinks: Iterable[Sink] | None = None) -> list[DataEvent]:
        out: list[DataEvent] = []
        for sink in self._sinks if sinks is None else sinks:
            out += sink.datas
        return sorted(out, key=lambda d: d.at_s)

    def start(self) -> SinkHost:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="smtpsink", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("sink loop did not start")
        for sink in self._sinks:
            fut = asyncio.run_coroutine_threadsafe(self._serve_one(sink), self._loop)
            fut.result(timeout=START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            if self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError("sink loop did not stop")
            self._thread = None
        if not self._loop.is_closed():
            self._loop.close()
        for sink in self._sinks:
            sink.sock.close()

    def __enter__(self) -> SinkHost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the loop thread ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop.wait(), self._max_lifetime_s)
        except TimeoutError:
            pass
        for server in self._servers:
            server.close()
        for transport in list(self._transports):
            transport.close()
        await asyncio.sleep(0.05)  # let connection_lost run and cancel the handlers
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _serve_one(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _CountingSMTP(
                sink,
                self,
                hostname=f"{sink.name}.sink.test",
                data_size_limit=sink.data_size_limit,  # announced as SIZE in EHLO
                tls_context=sink.tls_context,
                timeout=sink.idle_timeout_s,
                enable_SMTPUTF8=sink.smtputf8,
                authenticator=sink._authenticate if sink.users is not None else None,
                auth_required=sink.users is not None,
                auth_require_tls=True,
                # without users, no AUTH at all (aiosmtpd offers PLAIN/LOGIN by default)
                auth_exclude_mechanism=[] if sink.users is not None else ["PLAIN", "LOGIN"],
                loop=loop,
            ),
            sock=sink.sock,
        )
        self._servers.append(server)


def arrival_times(sink: Sink, n: int, timeout_s: float) -> list[float]:
    """When the accepted messages arrived (time.monotonic(), sorted), once `n` have;
    TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = sorted(d.at_s for d in sink.datas if d.accepted)
        if len(got) >= n:
            return got
        time.sleep(0.1)
    raise TimeoutError(f"{len(sink.datas)} of {n} messages arrived in {timeout_s:.0f} s")
