"""compression: deflate and inflate in ISA-L, for message bodies, peer messages and journal records.

A message body is deflated once, where it is accepted (intake.py, in an SMTP
worker or the API server), when it is `DEFLATE_FROM_BYTES` or more and its
samples compress (text and HTML: to a tenth or a third; base64 attachments do
not). It travels, is journalled and is kept in every node's queue state so,
and is inflated only when read (delivery, `queue show`, DSNs). Every node
writes each body into its state, and LMDB copies it twice on the way (into a
dirty page, then with `writev` into the page cache); and an entry deflated
only for the wire is inflated by every follower before it applies it.
Deflating at the door spares both.
The peer messages' framing (raft/wire.py) deflates what is left by the same
samples.

Inflating is bounded: a body's size is known (the Enqueue's `body_size`), and a
stream that inflates to more, to less, or not at all is `CorruptDataError`,
never a longer read.
"""

from __future__ import annotations

from typing import cast

from isal import isal_zlib

from mqnode.errors import CorruptDataError

DEFLATE_FROM_BYTES = 32 * 1024  # also the wire's `COMPRESS_FROM_BYTES`: below, framing wins
LEVEL = 1  # ISA-L's level 1: ~0.2 ms per 100 KiB of prose, a tenth of that for smtp-source's
SAMPLES = 4
SAMPLE_BYTES = 2048
DEFLATE_BELOW = 0.6
# Deflate gives at most ~1032 bytes for each byte of its stream (a 258-byte match in ~2
# bits): a size claimed beyond that cannot be what the stream holds.
MAX_RATIO = 1032
INFLATE_ERROR = cast(type[Exception], isal_zlib.error)  # typed as an object in isal's stubs


def sampled_ratio(data: bytes | memoryview) -> float:
    """About what deflate takes `data` down to (output / input), judged from samples.

    One sample at the middle of each of `SAMPLES` equal parts, none at the start (an
    entry starts with a command's envelope and a message's headers: text in front of
    100 KB of base64), each deflated on its own: an entry of two copies of one body
    (a newsletter sent as a message per recipient) put two equal samples side by
    side, and deflate found the second in the first. Either way such entries looked
    compressible, and were deflated (and inflated on every follower) to save a fifth."""
    if len(data) <= SAMPLES * SAMPLE_BYTES:
        return len(isal_zlib.compress(data, LEVEL)) / max(len(data), 1)
    part = len(data) // SAMPLES
    starts = [k * part + (part - SAMPLE_BYTES) // 2 for k in range(SAMPLES)]
    view = memoryview(data)
    packed = sum(len(isal_zlib.compress(view[i : i + SAMPLE_BYTES], LEVEL)) for i in starts)
    return packed / (SAMPLES * SAMPLE_BYTES)


def compressible(data: bytes | memoryview) -> bool:
    """Whether deflate would take `data` well below its size (`sampled_ratio`)."""
    return sampled_ratio(data) < DEFLATE_BELOW


def deflate(*parts: bytes) -> bytes:
    """The zlib stream of the parts joined (without joining them first)."""
    packer = isal_zlib.compressobj(LEVEL)
    out = [packer.compress(p) for p in parts]
    out.append(packer.flush())
    return b"".join(out)


def inflate(stream: bytes | memoryview, size: int, what: str) -> bytes:
    """The `size` bytes `stream` inflates to; CorruptDataError for anything else.

    At most `size` + 1 bytes are ever produced, whatever the stream holds."""
    unpacker = isal_zlib.decompressobj()
    try:
        out = unpacker.decompress(stream, size + 1)
    except INFLATE_ERROR as exc:
        raise CorruptDataError(f"{what}: does not inflate: {exc}") from exc
    if len(out) != size or not unpacker.eof or unpacker.unconsumed_tail:
        raise CorruptDataError(f"{what}: inflates to other than its {size} bytes")
    return out


def could_hold(stream_bytes: int, size: int) -> bool:
    """Whether a deflate stream of `stream_bytes` can inflate to `size` bytes at all."""
    return 0 <= size <= MAX_RATIO * stream_bytes + 64


def inflate_head(stream: bytes | memoryview, limit: int) -> bytes:
    """The first bytes `stream` inflates to, up to a mail header's end (its blank line) or
    `limit` bytes, whichever comes first (b"" if it does not inflate): enough to read a
    header without inflating the whole body. Inflated in growing steps from 4 KiB."""
    unpacker = isal_zlib.decompressobj()
    out = b""
    data, step = stream, 4096
    try:
        while len(out) < limit:
            piece = unpacker.decompress(data, min(step, limit - len(out)))
            searched_from = max(len(out) - 3, 0)
            out += piece
            if not piece or unpacker.eof or out.find(b"\r\n\r\n", searched_from) >= 0:
                break
            data, step = unpacker.unconsumed_tail, step * 4
    except INFLATE_ERROR:
        return b""
    return out
