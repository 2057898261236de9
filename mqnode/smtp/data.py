"""read_data: an SMTP DATA section read in large pieces, not line by line.

aiosmtpd reads DATA one line at a time (an await, a limit check and a copy
per line): ~1,300 event-loop turns for a 100 KiB message, most of the
aiosmtpd null handler's time at that size, and a tenth of the leader's CPU
for 1 KiB. This reads up to the end of DATA, `<CRLF>.<CRLF>`, in one search
(asyncio's `readuntil`) per `PIECE_BYTES`, and checks aiosmtpd's rules on the
whole:

* the message is everything before the lone-dot line, with the leading dot
  of each line removed (RFC 5321 4.5.2), ending with its last CRLF;
* more than `size_limit` bytes (counted before unstuffing, as aiosmtpd does):
  TOO_MUCH, answered 552 after the lone dot;
* a line longer than `line_limit` bytes with its CRLF: TOO_LONG, answered 500.
  When a message is both, the answer is 552 (aiosmtpd answers whichever it
  met first);
* memory: pieces are at most `PIECE_BYTES` (the StreamReader's limit is
  raised to that during DATA only: `_limit` is asyncio's private attribute,
  unchanged since 3.4); past `size_limit` nothing more is kept.

The search runs in C over the reader's buffer whatever the message holds
(searching for `.<CRLF>` instead stopped at every line ending in a full stop:
six times the time for prose, and a piece per line of `a.<CRLF>`). DATA
starts at a line start, so its first line may be the lone dot: the search
finds that too because a CRLF is put in front of the reader's buffer (its
`_buffer`, a bytearray in every asyncio since 3.4, which aiosmtpd's STARTTLS
clears the same way) and taken off the message again. Nothing past the
lone-dot line is read: a pipelining client's next command stays in the
reader.

tests/unit/test_smtp_data.py checks that the bytes and verdicts equal
aiosmtpd's own reading, with Hypothesis, and the read against a model.
"""

from __future__ import annotations

import asyncio
import re

NOMINAL, TOO_LONG, TOO_MUCH = "nominal", "too long", "too much"
PIECE_BYTES = 256 * 1024
_END = b"\r\n.\r\n"  # the lone-dot line, with the CRLF before it
_CRLF_DOT = re.compile(rb"\r\n\.")


async def read_data(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> tuple[bytes, str]:
    """(message, NOMINAL) or (b"", TOO_LONG/TOO_MUCH), the lone-dot line read either way.

    Raises what the reader raises (IncompleteReadError at end of file,
    CancelledError when the connection is lost).
    """
    parts: list[bytes] = []
    total = -2  # the message's bytes read so far (the CRLF put in front is not one)
    keep = True
    reader._buffer[:0] = b"\r\n"  # type: ignore[attr-defined]
    saved = reader._limit  # type: ignore[attr-defined]
    reader._limit = max(saved, PIECE_BYTES)  # type: ignore[attr-defined]
    try:
        while True:
            ended = True
            try:
                piece = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as exc:  # no end within PIECE_BYTES
                # asyncio leaves unread the last bytes an end could still begin in
                piece, ended = await reader.read(exc.consumed), False
            total += len(piece)
            if size_limit and total - 3 > size_limit:  # 3: ".<CRLF>", not the message's
                keep = False
                parts.clear()  # nothing more is kept; read on to the end
            elif keep:
                parts.append(piece)
            if ended:
                break
    finally:
        reader._limit = saved  # type: ignore[attr-defined]
    if not keep:
        return b"", TOO_MUCH
    # The first piece begins with the CRLF put in front, the last ends with the end
    # (5 bytes, of which the CRLF is the message's): at least "\r\n.\r\n" in all.
    if len(parts) == 1:
        data = parts[0][2:-3]
    else:
        parts[0], parts[-1] = parts[0][2:], parts[-1][:-3]
        data = b"".join(parts)
    if has_long_line(data, line_limit - 2):
        return b"", TOO_LONG
    return unstuff(data), NOMINAL


def has_long_line(data: bytes, longest: int) -> bool:
    """Whether a line (split at CRLF, without it) of `data` is longer than `longest`.

    A line of 2 * block bytes or more holds a whole block with no CRLF in it (blocks
    counted from a line start), so when every block has one (a C search each), no line
    is that long: 0.3-0.6 ms per MiB, where splitting the lines took 2-4.6 (a fifth of
    an SMTP worker's CPU at 1 MiB). Only the line around a block without a CRLF is
    measured, and the blocks go on after it: splitting the whole message there made a
    list of every line, ~10 times a message of short lines in memory.
    """
    size = len(data)
    if size <= longest:
        return False
    block = max(1, (longest + 1) // 2)
    find = data.find
    start = 0  # a line start
    while start + block <= size:
        if find(b"\r\n", start, start + block) >= 0:
            start += block
            continue
        before = data.rfind(b"\r\n", 0, start + 1)
        line_start = before + 2 if before >= 0 else 0
        after = find(b"\r\n", line_start)
        line_end = after if after >= 0 else size
        if line_end - line_start > longest:
            return True
        start = line_end + 2
    return False


def unstuff(data: bytes) -> bytes:
    """Remove the leading dot of every line (RFC 5321 4.5.2, as aiosmtpd does).

    Few messages have a line that starts with a dot: a search (sre, 0.44 ms per MiB)
    finds out before `replace`, which counts first (0.68 ms per MiB with none).
    """
    if data.startswith(b"."):
        data = data[1:]
    if _CRLF_DOT.search(data) is None:
        return data
    return data.replace(b"\r\n.", b"\r\n")
