"""The piecewise DATA reader answers exactly as aiosmtpd's line-by-line one.

Two servers on 127.0.0.1 in one event loop: aiosmtpd's own `SMTP`, and the
same class with SubmissionProtocol's `smtp_DATA`. A raw client sends both the
same session (bodies from Hypothesis: dots at line starts, lone CR and LF,
lines near the 1001-byte limit, sizes around the size limit, written in
random pieces) and the transcripts and the stored messages must be equal.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mqnode.smtp.data import has_long_line, unstuff
from mqnode.smtp.protocol import SubmissionProtocol

SIZE_LIMIT = 3000
LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, with the CRLF


class _Keep:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope.original_content or b"")
        return "250 OK kept"


class _Piecewise(SMTP):
    smtp_DATA = SubmissionProtocol.smtp_DATA


async def _session(cls: type[SMTP], chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    keep = _Keep()
    server = await asyncio.get_running_loop().create_server(
        lambda: cls(keep, data_size_limit=SIZE_LIMIT, hostname="h", ident="i"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.001)  # lets the server read this piece on its own
        transcript = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
    return transcript, keep.messages


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


_line = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
    st.sampled_from([b".", b"..", b". ", b".x", b"x.", b"\r", b"\n", b"a\rb", b"c\nd", b""]),
    st.integers(995, 1003).map(lambda n: b"L" * n),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_line, max_size=12),
    filler=st.integers(0, 3200),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_same_transcript_and_message_as_aiosmtpd(
    lines: list[bytes], filler: int, cuts: list[int]
) -> None:
    # as a client sends it: a line of one dot is stuffed (a lone dot would end DATA)
    body = b"".join((b".." if line == b"." else line) + b"\r\n" for line in lines)
    if filler:
        body += b"F" * (filler % 900 + 1) + b".\r\n" + b"G" * filler + b"\r\n"
    # A lone dot inside would end DATA early and turn the rest into commands: not
    # what this compares (and aiosmtpd may hang up on those, racing the writes).
    assume(b"\r\n.\r\n" not in b"\r\n" + body)
    long_line = any(len(x) > LINE_LIMIT - 2 for x in body.split(b"\r\n"))
    assume(not (long_line and len(body) > SIZE_LIMIT))  # both: aiosmtpd answers the first met
    session = (
        b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n"
    )
    chunks = _split(session, cuts)

    async def both() -> Any:
        return await _session(SMTP, chunks), await _session(_Piecewise, chunks)

    (theirs, their_msgs), (ours, our_msgs) = asyncio.run(both())
    assert ours == theirs
    assert our_msgs == their_msgs


def test_unstuff_removes_one_leading_dot_per_line() -> None:
    assert unstuff(b"..a\r\n.\r\nb.\r\n...\r\n") == b".a\r\n\r\nb.\r\n..\r\n"
    assert unstuff(b"") == b""


@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"x" * 7, b"\r\r\n"]), max_size=60),
    st.integers(min_value=0, max_value=40),
)
def test_the_long_line_check_equals_splitting_the_lines(pieces: list[bytes], longest: int) -> None:
    data = b"".join(pieces)
    expected = any(len(line) > longest for line in data.split(b"\r\n"))
    assert has_long_line(data, longest) == expected
