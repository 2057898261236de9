"""Replies: SMTP replies read in order, for commands sent together (PIPELINING, RFC 2920).

With a host that offers PIPELINING, the delivery agent (client.py) sends MAIL,
every RCPT and DATA in one write and reads their replies afterwards: one round
trip where there were two plus one per recipient, which is most of a message's
time to a distant host, and one event-loop turn and system call where there
were several. aiosmtplib cannot read such replies: its protocol keeps one
parsed reply and drops bytes that arrive before it is picked up, and a host
may answer several commands in one packet. So for the transaction the agent
lends the connection's transport to a `Replies` (`asyncio.Transport.set_protocol`)
and gives it back to aiosmtplib afterwards (`lend_transport`); connecting,
EHLO, STARTTLS, AUTH, RSET and QUIT stay aiosmtplib's.

Bounded: a reply line may be at most `MAX_LINE_BYTES`, and at most
`MAX_QUEUED` replies wait unread; more is a protocol error, as is a line that
does not start with a 3-digit code. The connection is then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from typing import cast

import aiosmtplib

MAX_LINE_BYTES = 4096  # RFC 5321 4.5.3.1.5: a reply line is at most 512 bytes
MAX_QUEUED = 256  # a transaction sends at most a few more commands than its recipients


class Replies(asyncio.Protocol):
    """Parses what the host sends into replies, kept in order until read."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []  # of a multi-line reply not yet complete
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.lost = False

    def data_received(self, data: bytes) -> None:
        if self._error is None:
            self._buffer += data
            try:
                self._parse()
            except aiosmtplib.SMTPResponseException as exc:
                self._error = exc
        self._wake()

    def _parse(self) -> None:
        start = 0
        buffer = self._buffer
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) > MAX_LINE_BYTES:
                raise _malformed("reply line too long")
            if not (line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n")):
                raise _malformed(f"malformed reply line: {line[:80]!r}")
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self._replies.append(aiosmtplib.SMTPResponse(int(line[:3]), "\n".join(self._lines)))
                self._lines = []
                if len(self._replies) > MAX_QUEUED:
                    raise _malformed("more replies than commands")
        del buffer[:start]
        if len(buffer) > MAX_LINE_BYTES:
            raise _malformed("reply line too long")

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(aiosmtplib.SMTPServerDisconnected(f"Connection lost: {exc or 'closed'}"))

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, timeout_s: float) -> aiosmtplib.SMTPResponse:
        """The next reply; replies that arrived before an error are still read first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._replies:
            if self._error is not None:
                raise self._error
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
            # A timer that ends the wait, not asyncio.wait_for (which wraps the future in
            # another and adds callbacks both ways): one wait per reply a message gets.
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(remaining, _stop_waiting, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        return self._replies.popleft()

    @property
    def idle(self) -> bool:
        """Nothing unread, nothing half-received and no error: the session may go on."""
        return not (self._replies or self._buffer or self._lines or self._error or self.lost)


def _stop_waiting(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)  # the loop in `read` sees the deadline passed


def _malformed(text: str) -> aiosmtplib.SMTPResponseException:
    return aiosmtplib.SMTPResponseException(-1, text)


@contextlib.contextmanager
def lend_transport(client: aiosmtplib.SMTP) -> Iterator[tuple[asyncio.WriteTransport, Replies]]:
    """The connection's transport with a `Replies` reading it, for the block.

    Given back to aiosmtplib's protocol afterwards when the session is intact: every
    reply read, the connection open. Otherwise (an error, a timeout, a reply left
    unread, the host gone) the connection is closed: what the host will still send
    could not be paired with a command.
    """
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # uvloop's transports are not asyncio.WriteTransport subclasses, but have its methods
    transport = cast(asyncio.WriteTransport | None, protocol.transport)
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    replies = Replies()
    transport.set_protocol(replies)
    intact = False
    try:
        yield transport, replies
        intact = replies.idle and not transport.is_closing()
    finally:
        if intact:
            transport.set_protocol(protocol)
        else:
            client.close()
