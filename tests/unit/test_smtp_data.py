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
import tracemalloc
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mqnode.smtp.data import NOMINAL, TOO_MUCH, has_long_line, read_data, unstuff
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


@settings(max_examples=500)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"x" * 7, b"\r\r\n"]), max_size=60),
    st.integers(min_value=0, max_value=40),
)
def test_the_long_line_check_equals_splitting_the_lines(pieces: list[bytes], longest: int) -> None:
    data = b"".join(pieces)
    expected = any(len(line) > longest for line in data.split(b"\r\n"))
    assert has_long_line(data, longest) == expected


# -- read_data on its own: a StreamReader fed in pieces, against a plain model ----------


def _model(stream: bytes) -> tuple[bytes, bytes]:
    """(message before unstuffing, what follows the lone-dot line) of a DATA stream."""
    end = (b"\r\n" + stream).index(b"\r\n.\r\n")
    return stream[:end], stream[end + 3 :]


class _Counting(asyncio.StreamReader):
    """Counts the reads read_data makes (each is an event-loop step at worst)."""

    calls = 0

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self.calls += 1
        return await super().readuntil(separator)

    async def readexactly(self, n: int) -> bytes:
        self.calls += 1
        return await super().readexactly(n)


async def _read_fed(
    chunks: list[bytes], size_limit: int | None = None
) -> tuple[bytes, str, bytes, int]:
    """Feed `chunks` one per loop turn while read_data reads: (message, verdict, what is
    left in the reader, reads made)."""
    reader = _Counting(limit=2**16)

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    message, verdict = await read_data(reader, size_limit, 10**9)
    await feeding
    return message, verdict, await reader.read(), reader.calls


_STREAM = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b".\r\n"]), max_size=40)


@settings(max_examples=600, deadline=None)
@given(body=_STREAM, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_reads_to_the_first_lone_dot_line_and_not_a_byte_further(
    body: list[bytes], cuts: list[int]
) -> None:
    # whatever the body, the first CRLF.CRLF (or a lone dot as the first line) ends it;
    # what follows (a pipelined command) stays unread
    stream = b"".join(body) + b"\r\n.\r\nQUIT\r\n"
    message, rest = _model(stream)
    got, verdict, left, _ = asyncio.run(_read_fed(_split(stream, cuts)))
    assert verdict == NOMINAL
    assert (got, left) == (unstuff(message), rest)


def test_a_line_ending_in_a_full_stop_does_not_cost_a_read() -> None:
    prose = b"A sentence that ends here.\r\nAnd one more that does too.\r\n" * 2000
    stream = prose + b".\r\n"
    got, verdict, left, calls = asyncio.run(_read_fed(_split(stream, list(range(0, 10**6, 4096)))))
    assert (got, verdict, left) == (prose, NOMINAL, b"")
    assert calls <= 1 + len(stream) // (256 * 1024), calls  # one search per piece


def test_a_lone_dot_first_is_an_empty_message_and_the_next_command_stays() -> None:
    for chunks in ([b".\r\nQUIT\r\n"], [b".", b"\r", b"\nQU", b"IT\r\n"]):
        assert asyncio.run(_read_fed(chunks))[:3] == (b"", NOMINAL, b"QUIT\r\n")


@pytest.mark.parametrize("line", [b"a.\r\n", b"\r\n", b"a\r\n", b".\r\r\n", b"\r\n.\r", b"..\r\n"])
def test_hostile_short_lines_cost_memory_like_their_bytes(line: bytes) -> None:
    # Lines that each could end DATA: a list of one object per piece took ~10 times
    # the message in memory (a 25 MiB message: ~300 MB).
    body = line * (2 * 1024 * 1024 // len(line))
    stream = body + b"\r\n.\r\n"
    tracemalloc.start()
    try:
        got, verdict, left, _ = asyncio.run(_read_fed([stream]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (got, verdict, left) == (unstuff(_model(stream)[0]), NOMINAL, b"")
    assert peak < 6 * len(stream), (peak, len(stream))  # fed, read, kept, joined, unstuffed


def test_the_long_line_check_keeps_no_list_of_lines() -> None:
    # one line past the half-way block size among millions of short ones
    data = b"ab\r\n" * (1024 * 1024) + b"x" * 600 + b"\r\n" + b"cd\r\n" * 1000
    longer = data + b"z" * 999
    tracemalloc.start()
    try:
        found = has_long_line(data, 998), has_long_line(longer, 998)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == (False, True)
    assert peak < 64 * 1024, peak


def test_past_the_size_limit_nothing_more_is_kept() -> None:
    stream = b"x.\r\n" * 100_000 + b".\r\nQUIT\r\n"
    got, verdict, left, _ = asyncio.run(_read_fed([stream], size_limit=1000))
    assert (got, verdict, left) == (b"", TOO_MUCH, b"QUIT\r\n")
    exact = b"y" * 998 + b"\r\n"  # 1,000 bytes: at the limit, not over it
    assert asyncio.run(_read_fed([exact + b".\r\n"], size_limit=1000))[:2] == (exact, NOMINAL)
    over = b"y" * 999 + b"\r\n"
    assert asyncio.run(_read_fed([over + b".\r\n"], size_limit=1000))[:2] == (b"", TOO_MUCH)
