"""The cheaper peer framing (mqnode/raft/wire.py) is read by stock pysyncobj code.

What a node sends after `install()` must be what an unpatched receiver
decodes with plain `zlib.decompress` and `pickle.loads` (pysyncobj's own
receive path), so nodes with and without it keep talking.
"""

from __future__ import annotations

import pickle
import zlib

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.tcp_connection as pysyncobj_tcp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqnode.raft import wire


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_a_stored_stream_is_what_zlib_reads_back(data: bytes) -> None:
    assert zlib.decompress(wire.stored_zlib(data, 3)) == data


@pytest.mark.parametrize("size", [0, 1, 65534, 65535, 65536, 131070, 131071, 200_003])
def test_stored_blocks_split_at_the_64k_limit(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = wire.stored_zlib(data)
    assert zlib.decompress(framed) == data
    blocks = max(1, -(-size // 0xFFFF))
    assert len(framed) == 2 + 5 * blocks + size + 4  # header, block heads, data, Adler-32


def test_after_install_a_message_reads_back_with_stock_zlib_and_pickle() -> None:
    wire.install()
    wire.install()  # idempotent
    entry = (b"\x01" + bytes(range(256)) * 8, 41, 3)
    message = ("rand-key", {"type": "append_entries", "entries": [entry] * 3, "term": 3})
    # TcpConnection.send's own expression, with the names it looks up at call time.
    data = pysyncobj_tcp.zlib.compress(pysyncobj_tcp.pickle.dumps(message), 3)
    assert pickle.loads(zlib.decompress(data)) == message
    assert pysyncobj_pickle.dumps(message)[:2] == b"\x80\x05"  # protocol 5: bytes as bytes
    # And what an unpatched node sends still reads on this one.
    old = zlib.compress(pickle.dumps(message, 2), 3)
    assert pysyncobj_pickle.loads(pysyncobj_tcp.zlib.decompress(old)) == message
