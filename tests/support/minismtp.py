"""A few-line SMTP server on 127.0.0.1 for what aiosmtpd will not do.

aiosmtpd has no implicit-TLS server mode and no way to drop a connection at a
given command without a reply; delivery tests need both. `serving` runs a
stream handler on a free loopback port; `answer` is a handler that speaks
just enough SMTP for one client: 220, EHLO with the given extensions, 250 to
everything else, 354 and one 250 per message, 221 to QUIT. `drop(line)`
closes the connection without a reply when it returns True; EHLO refusal,
STARTTLS (served or refused) and per-recipient replies can be scripted.

Bounded: each handler ends at EOF, QUIT or a drop; `serving` closes the
server when its block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """`handler` serving on 127.0.0.1 for the block; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def answer(
    name: bytes,
    extensions: tuple[bytes, ...] = (),
    received: list[bytes] | None = None,
    drop: Callable[[bytes], bool] = lambda line: False,
    ehlo_refusal: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    starttls_refusal: bytes | None = None,
    rcpt: Callable[[bytes], bytes | None] = lambda line: None,
    tls_versions: list[str] | None = None,
) -> Handler:
    """A handler answering as host `name`; every line it reads goes to `received`.

    `ehlo_refusal`: the reply to EHLO (HELO then gets 250, without extensions);
    `tls`: STARTTLS is offered and served with this context (the negotiated version
    goes to `tls_versions`; a failed handshake ends the session); `starttls_refusal`:
    the reply to STARTTLS instead; `rcpt`: the reply to a RCPT line (None: 250).
    """
    offered = (*extensions, b"STARTTLS") if tls is not None or starttls_refusal else extensions

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await session(reader, writer)
        finally:
            writer.close()  # also when the loop ends first and cancels this handler

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " + name + b" ESMTP\r\n")
        in_data = False
        secure = False
        while line := await reader.readline():
            if received is not None:
                received.append(line.rstrip(b"\r\n"))
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    writer.write(b"250 2.0.0 queued\r\n")
                continue
            if drop(line):
                break
            verb = line[:4].upper()
            if verb == b"EHLO" and ehlo_refusal is not None:
                writer.write(ehlo_refusal + b"\r\n")
            elif verb == b"EHLO":
                lines = [name, *(x for x in offered if not (secure and x == b"STARTTLS"))]
                writer.write(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]))
                writer.write(b"250 " + lines[-1] + b"\r\n")
            elif verb == b"STAR" and starttls_refusal is not None:
                writer.write(starttls_refusal + b"\r\n")
            elif verb == b"STAR" and tls is not None:
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                raw = writer.transport
                try:
                    await writer.start_tls(tls)
                except (ssl.SSLError, OSError):
                    raw.abort()  # a failed start_tls leaves the plain transport open
                    break
                secure = True
                ssl_object = writer.get_extra_info("ssl_object")
                if tls_versions is not None and ssl_object is not None:
                    tls_versions.append(str(ssl_object.version()))
                continue
            elif verb == b"RCPT" and (reply := rcpt(line)) is not None:
                writer.write(reply + b"\r\n")
            elif verb == b"AUTH":
                writer.write(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()

    return serve
