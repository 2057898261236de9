"""PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write to a host that offers it.

The agent is mqnode's own, in this process; each host is a small SMTP server on
127.0.0.1 (tests/support/minismtp.py, or a script here that answers a whole
pipelined group in one packet, as Postfix does). Postfix itself as the receiver,
with refused recipients and STARTTLS, is in tests/interop/test_postfix.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mqnode.delivery.client import Attempt, DeliveryAgent, Target, Transaction
from mqnode.spool.model import Outcome
from tests.support import minismtp
from tests.support.tlscert import make_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BODY = b"From: a@client.test\r\nSubject: hi\r\nMessage-ID: <m@t>\r\n\r\n.dot line\r\nhello\r\n"
DELIVERED, DEFERRED, BOUNCED = (
    o.value for o in (Outcome.DELIVERED, Outcome.DEFERRED, Outcome.BOUNCED)
)
RCPTS = ((0, "ok@x.test"), (1, "gone@x.test"))
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _deliver_twice(
    handler: Handler, rcpts: tuple[tuple[int, str], ...] = RCPTS, uvloop: bool = False
) -> tuple[Attempt, Attempt, int]:
    """Two deliveries through one agent (the second may reuse the parked session), and
    how many connections the agent opened; on uvloop's event loop (the node's) or asyncio's."""

    async def run() -> tuple[Attempt, Attempt, int]:
        async with minismtp.serving(handler) as port:
            agent = DeliveryAgent("client.test", timeout_s=5)
            try:
                target = Target("mx.x.test", "127.0.0.1", port)
                tx = Transaction((target,), "a@client.test", rcpts, BODY, lambda: True)
                first = await agent.deliver(tx)
                return first, await agent.deliver(tx), agent.connects
            finally:
                await agent.close()

    if uvloop:
        import uvloop as uv

        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            return runner.run(run())
    return asyncio.run(run())


LOOPS = pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])


def _outcomes(attempt: Attempt) -> list[str]:
    return [out for _, out, _ in attempt.results]


def _batching_host(chunks: list[bytes], bodies: list[bytes], byte_by_byte: bool = False) -> Handler:
    """Offers PIPELINING; answers MAIL, both RCPTs and DATA together once DATA is in, with
    a multi-line reply among them; `chunks`: what each read brought before DATA."""
    group = (
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no such user\r\n550 5.1.1 really not\r\n"
        b"354 go ahead\r\n"
    )

    async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
        for piece in [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]:
            writer.write(piece)
            await writer.drain()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await send(writer, b"220 mx.x.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    await send(writer, b"250-mx.x.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    got = line
                    while not got.endswith(b"DATA\r\n"):
                        got += await reader.read(4096)
                    chunks.append(got)
                    await send(writer, group)
                    bodies.append(await reader.readuntil(b"\r\n.\r\n"))
                    await send(writer, b"250 2.0.0 queued as X\r\n")
                elif verb == b"QUIT":
                    await send(writer, b"221 bye\r\n")
                    break
                else:
                    await send(writer, b"250 2.0.0 ok\r\n")
        finally:
            writer.close()

    return serve


def _scripted(reply: Callable[[bytes], bytes], lines: list[bytes] | None = None) -> Handler:
    """Answers each line with `reply(line)` (every line read goes to `lines`)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx ESMTP\r\n")
            while line := await reader.readline():
                if lines is not None:
                    lines.append(line)
                writer.write(reply(line))
                await writer.drain()
                if line[:4].upper() == b"QUIT":
                    break
        finally:
            writer.close()

    return serve


@LOOPS
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["one-packet", "byte-by-byte"])
def test_one_write_out_replies_paired_in_order_and_the_session_reused(
    byte_by_byte: bool, uvloop: bool
) -> None:
    chunks: list[bytes] = []
    bodies: list[bytes] = []
    host = _batching_host(chunks, bodies, byte_by_byte)
    first, second, connects = _deliver_twice(host, uvloop=uvloop)
    for attempt in (first, second):
        assert _outcomes(attempt) == [DELIVERED, BOUNCED], attempt
        assert attempt.results[1][2] == "550 5.1.1 no such user\n5.1.1 really not"
    assert connects == 1  # the session went back to aiosmtplib intact, and was reused
    # MAIL, both RCPTs and DATA came in the first read
    assert [c.count(b"\r\n") for c in chunks] == [4, 4], chunks
    assert bodies[0] == BODY.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"


def test_a_refused_mail_refuses_every_recipient_and_no_body_is_sent() -> None:
    lines: list[bytes] = []

    replies = {
        b"EHLO": b"250-mx\r\n250 PIPELINING\r\n",
        b"MAIL": b"452 4.3.1 insufficient system storage\r\n",
        b"RCPT": b"503 5.5.1 need MAIL command\r\n",  # as Postfix answers after that
        b"DATA": b"503 5.5.1 need RCPT command\r\n",
        b"QUIT": b"221 bye\r\n",
    }
    serve = _scripted(lambda line: replies.get(line[:4].upper(), b"250 ok\r\n"), lines)

    first, _, _ = _deliver_twice(serve)
    assert _outcomes(first) == [DEFERRED, DEFERRED], first
    assert all(reply.startswith("MAIL: 452 4.3.1") for _, _, reply in first.results)
    assert not any(b"hello" in line for line in lines), "the body went out"


def test_a_354_after_every_recipient_was_refused_gets_a_bare_dot() -> None:
    lines: list[bytes] = []
    handler = minismtp.answer(
        b"mx.x.test", (b"PIPELINING",), received=lines, rcpt=lambda line: b"550 5.1.1 unknown"
    )
    first, _, _ = _deliver_twice(handler)
    assert _outcomes(first) == [BOUNCED, BOUNCED], first
    data = lines.index(b"DATA")
    assert lines[data + 1] == b"."  # an empty message, which has no recipients to go to
    assert not any(b"hello" in line for line in lines)


@LOOPS
def test_a_host_that_drops_the_connection_mid_group_gets_it_deferred(uvloop: bool) -> None:
    handler = minismtp.answer(b"mx.x.test", (b"PIPELINING",), drop=lambda line: b"gone@" in line)
    first, second, _ = _deliver_twice(handler, uvloop=uvloop)
    for attempt in (first, second):
        assert _outcomes(attempt) == [DEFERRED, DEFERRED], attempt
        assert "lost connection" in attempt.results[0][2], attempt


def test_a_malformed_reply_closes_the_session_and_defers() -> None:
    replies = {b"EHLO": b"250-mx\r\n250 PIPELINING\r\n", b"MAIL": b"hello there, not SMTP\r\n"}
    serve = _scripted(lambda line: replies.get(line[:4].upper(), b"250 ok\r\n"))
    first, _, connects = _deliver_twice(serve)
    assert _outcomes(first) == [DEFERRED, DEFERRED], first
    assert "malformed reply" in first.results[0][2], first
    assert connects == 2  # that session was closed, not parked


@LOOPS
def test_pipelining_over_starttls(tmp_path: Path, uvloop: bool) -> None:
    cert = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    lines: list[bytes] = []
    versions: list[str] = []
    handler = minismtp.answer(
        b"mx.x.test",
        (b"PIPELINING",),
        received=lines,
        tls=ctx,
        tls_versions=versions,
        rcpt=lambda line: b"550 5.1.1 unknown" if b"gone@" in line else None,
    )
    first, second, connects = _deliver_twice(handler, uvloop=uvloop)
    for attempt in (first, second):
        assert _outcomes(attempt) == [DELIVERED, BOUNCED], attempt
    assert versions and versions[0] in ("TLSv1.2", "TLSv1.3")
    assert connects == 1


@LOOPS
def test_a_host_that_never_answers_the_final_dot_is_given_up_at_the_timeout(
    uvloop: bool,
) -> None:
    silent = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-mx\r\n250 PIPELINING\r\n")
                elif verb == b"MAIL":
                    while not line.endswith(b"DATA\r\n"):
                        line += await reader.read(4096)
                    writer.write(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    silent.set()
                    await asyncio.sleep(30)  # no reply to the end of the message
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def run() -> tuple[Attempt, float]:
        async with minismtp.serving(serve) as port:
            agent = DeliveryAgent("client.test", timeout_s=0.5)
            try:
                target = Target("mx.x.test", "127.0.0.1", port)
                tx = Transaction((target,), "a@client.test", RCPTS[:1], BODY, lambda: True)
                loop = asyncio.get_running_loop()
                started = loop.time()
                attempt = await asyncio.wait_for(agent.deliver(tx), 20)
                return attempt, loop.time() - started
            finally:
                await agent.close()

    if uvloop:
        import uvloop as uv

        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            attempt, took = runner.run(run())
    else:
        attempt, took = asyncio.run(run())
    assert silent.is_set()
    assert _outcomes(attempt) == [DEFERRED], attempt
    assert took < 15, took  # the 0.5 s read timeout, not the host's 30 s
