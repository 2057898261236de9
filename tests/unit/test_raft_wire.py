"""The cheaper framing (mqnode/raft/wire.py): pickles and zlib streams stock code reads; AES-GCM.

What a node sends after `install()` must be what pysyncobj's receive path
decodes with `zlib.decompress` and `pickle.loads`; the encryptor must refuse
anything altered, another secret's tokens and an older release's (Fernet).
"""

from __future__ import annotations

import base64
import os
import pickle
import zlib
from unittest import mock

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.tcp_connection as pysyncobj_tcp
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet

from mqnode.raft import wire


def test_after_install_a_message_reads_back_with_stock_zlib_and_pickle() -> None:
    wire.install()
    wire.install()  # idempotent
    entry = (b"\x01" + bytes(range(256)) * 8, 41, 3)
    message = ("rand-key", {"type": "append_entries", "entries": [entry] * 3, "term": 3})
    # TcpConnection.send's own expression, with the names it looks up at call time.
    data = pysyncobj_tcp.zlib.compress(pysyncobj_tcp.pickle.dumps(message), 3)
    assert pickle.loads(zlib.decompress(data)) == message
    assert pysyncobj_pickle.dumps(message)[:2] == b"\x80\x05"  # protocol 5: bytes as bytes
    old = zlib.compress(pickle.dumps(message, 2), 3)  # what an unpatched node sends
    assert pysyncobj_pickle.loads(pysyncobj_tcp.zlib.decompress(old)) == message


def test_stored_zlib_streams_of_any_size_read_back_with_stock_zlib() -> None:
    for size in (0, 1, 1000, 0xFFFF, 0x10000, 200_001):
        data = bytes(i % 251 for i in range(size))
        assert zlib.decompress(wire.stored_zlib(data)) == data


def test_small_messages_go_stored_and_big_ones_deflated() -> None:
    small = b"a" * (wire.COMPRESS_FROM_BYTES - 1)
    big = b"a" * wire.COMPRESS_FROM_BYTES
    assert len(wire._Deflate.compress(small, 3)) > len(small)  # stored: framing only
    assert len(wire._Deflate.compress(big, 3)) < len(big) // 10
    for data in (small, big):
        assert zlib.decompress(wire._Deflate.compress(data, 3)) == data


def _encryptor(secret: str = "unit-test-cluster-secret-0123456789") -> wire.AeadEncryptor:
    return wire.aead_encryptor(secret)


def test_a_token_decrypts_with_the_same_secret_and_carries_its_timestamp() -> None:
    sender, receiver = _encryptor(), _encryptor()
    token = sender.encrypt_at_time(b"payload", 1234)
    assert receiver.extract_timestamp(token) == 1234
    assert receiver.decrypt(token) == b"payload"


def test_a_token_fails_with_another_secret_or_any_byte_changed() -> None:
    token = _encryptor().encrypt_at_time(b"payload", 7)
    with pytest.raises(InvalidTag):
        _encryptor("another-cluster-secret-0123456789").decrypt(token)
    receiver = _encryptor()
    for i in range(1, len(token)):  # byte 0 is the version: its own error below
        bad = token[:i] + bytes([token[i] ^ 1]) + token[i + 1 :]
        with pytest.raises(InvalidTag):
            receiver.decrypt(bad)  # the timestamp too: it is authenticated


def test_a_fernet_token_or_garbage_is_refused_not_misread() -> None:
    fernet = Fernet(Fernet.generate_key()).encrypt_at_time(b"payload", 7)
    receiver = _encryptor()
    for token in (fernet, b"", b"\xa1short"):
        with pytest.raises(ValueError):
            receiver.extract_timestamp(token)
        with pytest.raises(ValueError):
            receiver.decrypt(token)


def test_nonces_never_repeat_and_take_a_new_prefix_before_the_counter_wraps() -> None:
    enc = _encryptor()
    nonces = {enc._nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    prefix = enc._prefix
    enc._counter = 2**32 - 2
    assert enc._nonce()[:8] == prefix  # the last one of this prefix
    wrapped = enc._nonce()
    assert wrapped[:8] != prefix and wrapped[8:] == (1).to_bytes(4, "big")


def test_a_big_entry_is_deflated_once_for_every_follower_and_read_as_bytes() -> None:
    """A message's pickle differs per connection (pysyncobj's random key in front), so
    a big entry deflates itself once, on the object the journal keeps, and any
    receiver unpickles plain bytes (stock pickle: an older release reads it too)."""
    wire.install()
    text = wire.wire_command(b"\x01" + b"entries for both followers " * 4000)
    assert isinstance(text, wire.WireCommand)
    msgs = [
        (key, {"type": "append_entries", "entries": [(text, 7, 2)], "term": 2})
        for key in (b"follower-1-key", b"follower-2-key")
    ]
    framed = [pysyncobj_tcp.zlib.compress(pysyncobj_tcp.pickle.dumps(m), 3) for m in msgs]
    deflated = text.__dict__["deflated"]
    assert zlib.decompress(deflated) == text and len(deflated) < len(text) // 10
    for key, data in zip((b"follower-1-key", b"follower-2-key"), framed, strict=True):
        assert len(data) < len(text) // 10  # the entry went deflated, the message stored
        got_key, message = pickle.loads(zlib.decompress(data))
        (command, idx, term) = message["entries"][0]
        assert got_key == key and (idx, term) == (7, 2)
        assert type(command) is bytes and command == text
    assert text.__dict__["deflated"] is deflated  # not deflated again
    # what does not compress pickles as plain bytes; small commands stay plain bytes
    attachment = wire.wire_command(base64.encodebytes(os.urandom(80_000)))
    got = pickle.loads(pickle.dumps(attachment, 5))
    assert type(got) is bytes and got == attachment and attachment.__dict__["deflated"] == b""
    small = b"\x01" + b"x" * 100
    assert wire.wire_command(small) is small


def test_what_does_not_compress_goes_stored() -> None:
    """A base64 attachment deflates to ~77% at ~2 ms per 100 KB: sent stored instead;
    text around it still decides for deflate when it is most of the message."""
    attachment = base64.encodebytes(os.urandom(80_000))
    assert not wire.compressible(attachment)
    framed = wire._Deflate.compress(attachment, 3)
    assert len(framed) > len(attachment) and zlib.decompress(framed) == attachment
    mail = b"Subject: report\r\n\r\n" + b"<p>Quarterly figures, as promised.</p>\r\n" * 2500
    assert wire.compressible(mail + attachment[:10_000])
    assert len(wire._Deflate.compress(mail, 3)) < len(mail) // 10


def test_copies_of_one_attachment_and_headers_in_front_go_stored() -> None:
    """A newsletter sent as a message per recipient puts copies of one body in an
    entry, and every entry starts with an envelope and headers: neither makes 100 KB
    of base64 look compressible (each was deflated at ~2 ms per 100 KB)."""
    headers = b"From: <news@shop.test>\r\nSubject: your statement\r\n" * 20
    body = headers + base64.encodebytes(os.urandom(75_000))
    assert not wire.compressible(body)
    assert not wire.compressible(body + body)
    assert not wire.compressible(b"".join([body] * 10))
    html = b"<tr><td>Product</td><td>$9.99</td><td><a href='https://x.test/p'>Buy</a></td></tr>\n"
    assert wire.compressible(html * 3000) and wire.compressible(html * 20)


def test_our_loader_reads_what_stock_pickle_reads_and_inflates_in_isal() -> None:
    """Peer messages are read by `wire.loads`, which runs a deflated entry's
    `zlib.decompress` in ISA-L: same objects as stock pickle, of either kind of entry."""
    wire.install()
    text = wire.wire_command(b"\x01" + b"text that deflates well " * 5000)
    attachment = wire.wire_command(b"\x01" + os.urandom(60_000))
    message = (b"key", {"type": "append_entries", "entries": [(text, 3, 1), (attachment, 4, 1)]})
    data = pysyncobj_tcp.pickle.dumps(message)
    assert wire.loads(data) == pickle.loads(data) == message
    inflated: list[bytes] = []

    def inflate(packed: bytes) -> bytes:
        inflated.append(packed)
        return zlib.decompress(packed)

    with mock.patch.object(wire.isal_zlib, "decompress", inflate):
        assert wire.loads(data) == message
    assert inflated == [text.__dict__["deflated"]]
