"""Bodies deflated where they are accepted (mqnode/compression.py): what intake sends, what
the state keeps, what reading gives back, and what an older member is never sent."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from dataclasses import replace

import pytest

from mqnode.clock import ManualClock
from mqnode.compression import DEFLATE_FROM_BYTES, deflate, inflate, inflate_head
from mqnode.errors import CorruptDataError, SubmitError
from mqnode.raft.formats import LevelGate
from mqnode.signing.keys import signing_domains
from mqnode.smtp.worker_pool import _header_part
from mqnode.spool.commands import (
    BIG_ENTRIES,
    BIG_ENTRIES_LEVEL,
    DEFLATE,
    DEFLATED_BODY_LEVEL,
    READS_LEVEL,
    Enqueue,
    EntrySizes,
    PutChunk,
    encode_entry,
    entry_sizes,
)
from mqnode.spool.store import QueueStore
from mqnode.storage import checked_view, crc_view, with_crc

from .kit import Recorder, Transcript, commands_of_one_message, enqueue

SIZES = entry_sizes(READS_LEVEL)
PROSE = b"".join(
    b"Line %d of a letter that says much the same thing again.\r\n" % i for i in range(4000)
)


def _text(size: int) -> bytes:
    return b"Subject: news\r\n\r\n" + (PROSE * (size // len(PROSE) + 1))[:size]


def _attachment(size: int) -> bytes:
    b64 = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return b"Subject: file\r\nContent-Type: application/octet-stream\r\n\r\n" + b64


def test_the_level_that_reads_deflated_bodies_lets_intake_send_them() -> None:
    assert READS_LEVEL >= DEFLATED_BODY_LEVEL
    assert entry_sizes(DEFLATED_BODY_LEVEL).deflate_bodies
    assert not entry_sizes(BIG_ENTRIES_LEVEL).deflate_bodies
    assert entry_sizes(BIG_ENTRIES_LEVEL) == BIG_ENTRIES


def test_inflating_gives_exactly_the_size_or_refuses() -> None:
    body = _text(100_000)
    stream = deflate(body[:10], body[10:])
    assert zlib.decompress(stream) == body, "an ordinary zlib stream"
    assert inflate(stream, len(body), "b") == body
    for wrong in (len(body) - 1, len(body) + 1, 0):
        with pytest.raises(CorruptDataError):
            inflate(stream, wrong, "b")
    with pytest.raises(CorruptDataError):
        inflate(stream[:-10], len(body), "b")  # cut short
    with pytest.raises(CorruptDataError):
        inflate(b"not a zlib stream", len(body), "b")
    bomb = deflate(b"\0" * 50_000_000)
    with pytest.raises(CorruptDataError):
        inflate(bomb, 1000, "b")  # stops at 1,001 bytes, never inflates 50 MB
    assert inflate_head(stream, 20) == body[:20]
    assert inflate_head(b"junk", 20) == b""


@pytest.mark.parametrize("header_bytes", [100, 4093, 4096, 30_000])
def test_a_header_is_read_without_inflating_the_whole_body(header_bytes: int) -> None:
    header = b"X-Pad: " + b"p" * (header_bytes - 9) + b"\r\n"
    body = header + b"\r\n" + _text(300_000)
    head = inflate_head(deflate(body), 256 * 1024)
    assert head.startswith(header + b"\r\n") and len(head) < len(header) + 64 * 1024


@pytest.mark.parametrize(
    ("body", "sizes", "deflated", "chunked"),
    [
        (_text(100_000), SIZES, True, False),
        (_text(5 * 1024 * 1024), SIZES, True, False),  # a few hundred KiB deflated: inline
        (_attachment(100_000), SIZES, False, False),
        (_text(DEFLATE_FROM_BYTES // 2), SIZES, False, False),
        (_text(100_000), BIG_ENTRIES, False, False),  # a member reads level 6 only
        (_attachment(1_500_000), SIZES, False, True),
    ],
    ids=["text", "5 MiB text", "attachment", "small", "below the level", "big attachment"],
)
def test_intake_deflates_what_compresses_and_the_state_gives_it_back(
    store: QueueStore, body: bytes, sizes: EntrySizes, deflated: bool, chunked: bool
) -> None:
    cmds = commands_of_one_message(store, sizes, body)
    (cmd,) = [c for c in cmds if isinstance(c, Enqueue)]
    assert (cmd.body_encoding == DEFLATE) is deflated
    assert any(isinstance(c, PutChunk) for c in cmds) is chunked
    if deflated:
        assert cmd.body is not None and len(cmd.body) < len(body) // 2
    assert all(len(encode_entry([c])) < sizes.max_entry for c in cmds)
    (msg,) = store.list_messages(10)
    stored = store.read_body(msg)
    assert stored.endswith(body) and len(stored) == msg.size == cmd.body_size
    assert hashlib.sha256(stored).digest() == msg.body_sha256, "over the body, not the stream"
    # `queue show` reads the header only: inflated as far as its end, or the first chunk
    head = store.read_head(msg, 4096)
    assert stored.startswith(head) and b"\r\n\r\n" in head
    if deflated or chunked:
        assert len(head) < min(len(stored), SIZES.chunk + 1), len(head)


def test_a_deflated_body_is_held_as_its_size_and_a_flipped_bit_is_corruption(
    tx: Transcript, store: QueueStore
) -> None:
    body = _text(100_000)
    cmd = replace(enqueue("Q1", body=deflate(body)), body_size=len(body), body_encoding=DEFLATE)
    assert tx.one(cmd) == ("queued", "Q1")
    assert store.body_bytes_held == len(body)
    (msg,) = store.list_messages(10)
    assert store.read_body(msg) == body
    key = b"Q1\x00" + (0).to_bytes(4, "big")
    with store._env.begin(write=True, db=store._body) as txn:
        raw = bytearray(txn.get(key))
        assert raw[4:] == cmd.body, "kept as it came"
        raw[100] ^= 1
        txn.put(key, bytes(raw))
    with pytest.raises(CorruptDataError):
        store.read_body(msg)


def test_a_marked_record_is_refused_where_only_plain_ones_are_read() -> None:
    marked = with_crc(b"a deflated body", marked=True)
    assert crc_view(marked, "r") == (memoryview(b"a deflated body"), True)
    assert crc_view(with_crc(b"plain"), "r")[1] is False
    with pytest.raises(CorruptDataError):
        checked_view(marked, "r")


@pytest.mark.parametrize(
    "changes",
    [
        {"body_encoding": "gzip"},
        {"body_encoding": DEFLATE, "body": None, "upload_id": "U1", "chunks": 1},
    ],
    ids=["unknown", "without an inline body"],
)
def test_an_unknown_encoding_or_one_without_a_body_is_rejected(
    tx: Transcript, store: QueueStore, changes: dict[str, object]
) -> None:
    status, why = tx.one(replace(enqueue("Q1"), **changes))
    assert status == "rejected" and "body encoding" in why
    assert store.list_messages(10) == []


def test_a_size_no_deflate_stream_of_that_length_can_hold_is_rejected(
    tx: Transcript, store: QueueStore
) -> None:
    """So that reading never inflates more than about a thousand times an entry."""
    stream = deflate(b"\0" * 1_000_000)  # about a thousand times smaller: as far as it goes
    ok = replace(enqueue("Q1", body=stream), body_size=1_000_000, body_encoding=DEFLATE)
    assert tx.one(ok) == ("queued", "Q1")
    absurd = replace(ok, queue_id="Q2", idem_key=b"k2", body_size=2000 * len(stream))
    status, why = tx.one(absurd)
    assert status == "rejected" and "cannot hold" in why
    assert [m.queue_id for m in store.list_messages(10)] == ["Q1"]


def test_a_member_below_the_level_is_sent_the_body_inflated() -> None:
    body = _text(100_000)
    cmd = replace(enqueue("Q1", body=deflate(body)), body_size=len(body), body_encoding=DEFLATE)
    level = [DEFLATED_BODY_LEVEL - 1]
    rec = Recorder()
    gate = LevelGate(rec, lambda: level[0], ManualClock())
    asyncio.run(gate.submit(cmd))
    assert rec.got[-1] == replace(cmd, body=body, body_encoding="")
    level[0] = DEFLATED_BODY_LEVEL
    asyncio.run(gate.submit(cmd))
    assert rec.got[-1] == cmd, "read again before inflating anything"


@pytest.mark.parametrize(
    ("level", "size"),
    [(DEFLATED_BODY_LEVEL - 1, 2_000_000), (BIG_ENTRIES_LEVEL - 1, 100_000)],
    ids=["2 MB at level 6", "100 KB below level 6"],
)
def test_a_body_inflated_for_an_older_member_that_no_longer_fits_is_refused(
    level: int, size: int
) -> None:
    """Never an entry bigger than the level allows: a 451, and the retry is chunked."""

    body = _text(size)
    cmd = replace(enqueue("Q1", body=deflate(body)), body_size=len(body), body_encoding=DEFLATE)
    rec = Recorder()
    gate = LevelGate(rec, lambda: level, ManualClock())
    with pytest.raises(SubmitError, match="do not fit one entry"):
        asyncio.run(gate.submit(cmd))
    assert rec.got == []


def test_the_node_finds_signatures_in_a_deflated_body() -> None:
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1;\r\n b=abc\r\n"
    body = signed + _text(100_000)
    cmd = replace(enqueue("Q1", body=deflate(body)), body_size=len(body), body_encoding=DEFLATE)
    assert signing_domains(_header_part(cmd)) == ["example.org"]
    assert signing_domains(_header_part(enqueue("Q2", body=body))) == ["example.org"]
