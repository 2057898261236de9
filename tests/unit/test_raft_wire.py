"""The cheaper pickling (mqnode/raft/wire.py) is read by stock pysyncobj code.

What a node sends after `install()` must be what an unpatched receiver
decodes with `zlib.decompress` and `pickle.loads` (pysyncobj's own receive
path), and what an unpatched node sends must still read here.
"""

from __future__ import annotations

import pickle
import zlib

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.tcp_connection as pysyncobj_tcp

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
