"""Cheaper framing of pysyncobj's peer messages, readable by any pysyncobj 0.3.17 node.

pysyncobj frames every message between nodes as
`encrypt(zlib.compress(pickle.dumps(message, protocol=2), 3))`. Two parts of
that cost CPU the nodes share with SMTP and buy nothing on a cluster network:

* `zlib.compress` costs ~45 us a call whatever the size (deflate's state is
  allocated and cleared every time), and the leader calls it for every
  AppendEntries to every follower. We send a *stored* zlib stream instead
  (RFC 1950/1951 blocks of type 0: the bytes as they are plus an Adler-32),
  which the receiving side's own `zlib.decompress` reads unchanged: 1.6 us
  for the same 5 KiB. Mail on the wire between nodes grows by what deflate
  saved (text bodies 2-4x); at 2,000 msg/s of 1 KiB that is a few MB/s.
* Protocol 2 pickles `bytes` as latin-1 text (decoded and re-encoded both
  ways, binary bytes taking two); every entry is a bytes object. Protocol 5
  writes them as they are. Any Python 3.8+ unpickler reads it.

`install()` swaps both in pysyncobj's modules (it looks the names up at call
time); idempotent. It changes only bytes on the wire, never what a message
means, so nodes with and without it talk to each other.
"""

from __future__ import annotations

import struct
import types
import zlib

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.tcp_connection as pysyncobj_tcp

_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no dictionary, "fastest"
_STORED_MAX = 0xFFFF
_BLOCK = struct.Struct("<BHH")  # BFINAL|BTYPE=00, LEN, NLEN
_ADLER = struct.Struct(">I")
PICKLE_PROTOCOL = 5  # fixed, not HIGHEST_PROTOCOL: a newer Python's could not be read by older ones


def stored_zlib(data: bytes, level: int = 0) -> bytes:
    """`data` as a zlib stream of stored (uncompressed) blocks; `level` is ignored."""
    out = [_ZLIB_HEADER]
    view = memoryview(data)
    pos, end = 0, len(data)
    while True:
        chunk = view[pos : pos + _STORED_MAX]
        pos += len(chunk)
        final = pos >= end
        out.append(_BLOCK.pack(1 if final else 0, len(chunk), len(chunk) ^ 0xFFFF))
        out.append(chunk.tobytes())
        if final:
            break
    out.append(_ADLER.pack(zlib.adler32(data)))
    return b"".join(out)


_ZLIB = types.SimpleNamespace(compress=stored_zlib, decompress=zlib.decompress)


def install() -> None:
    """Make pysyncobj send stored zlib streams of protocol-5 pickles (see the module doc)."""
    pysyncobj_tcp.zlib = _ZLIB
    # pysyncobj.pickle.dumps reads its module global `__protocol` at every call.
    setattr(pysyncobj_pickle, "__protocol", PICKLE_PROTOCOL)
