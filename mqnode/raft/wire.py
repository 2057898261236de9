"""Cheaper framing of pysyncobj's peer messages: protocol-5 pickles, AES-GCM, deflate for big ones.

pysyncobj frames every message between nodes as
`fernet(zlib.compress(pickle.dumps(message, protocol=2), 3))`. Under load
that framing was the leader's largest Raft cost: sending one round of new
entries to two followers took ~0.27 ms of CPU (deflate at level 3 ~140 us
and Fernet ~27 us per 10 KB message), and a follower paid ~65 us to read
one (Fernet checks the HMAC and decodes base64 twice: once for the
timestamp, once for the data) and ~60 us to frame its tiny ack (deflate's
set-up dominates small inputs). `install()` swaps the three parts, process
wide, through pysyncobj's module globals; its TcpConnection code is
unchanged:

* Pickle protocol 5, not 2: protocol 2 pickles `bytes` as latin-1 text.
* `AeadEncryptor` (AES-256-GCM, one C call each way) instead of Fernet, with
  the same three methods pysyncobj calls. The token carries pysyncobj's
  timestamp (its replay check reads it before decrypting) as authenticated
  data. Nonces are a random 64-bit prefix per encryptor and a 32-bit counter
  (a new prefix before the counter wraps), so no nonce repeats under the
  cluster key however long the cluster runs (random 96-bit nonces would be
  bounded at 2^32 messages per key). The key comes from the cluster secret by
  PBKDF2 with our own salt, as pysyncobj derives Fernet's.
* Messages under `COMPRESS_FROM_BYTES` go as stored (uncompressed) zlib
  streams, which any zlib reader takes; bigger ones are deflated at level 1
  when samples of them compress (base64 attachments do not: `_Deflate`). A
  big entry is deflated on its own, once (`WireCommand`), not once per
  follower inside each message.
  Not compressing at all was tried: pysyncobj grows its socket buffers with
  `bytes +=` and slices them per message, quadratic in what is pending, and a
  follower catching up (64 KB batches, thousands of entries) stalled its node
  for seconds with 3-4x the bytes (kill-leader rounds: 1 s outages became
  3-6 s). Catch-up batches are at least 64 KB, so they are still deflated
  (raft/guarded.py's send buffer is linear).
* Deflate, inflate and the streams' Adler-32 run in ISA-L (`isal_zlib`), whose
  output is an ordinary zlib stream: 100 KiB of text deflates in ~15 us
  where the system zlib at level 1 takes ~250 us. Received messages are read
  by `loads`, which inflates a big entry in ISA-L too (half the time).

Compatibility: the peer protocol changed with AES-GCM. A node of an older
release (Fernet) and one of this release cannot read each other: the
connection is closed at the key exchange and both log it (transport.py).
Upgrade all nodes together.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import zlib
from typing import Any, SupportsIndex

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.syncobj as pysyncobj_syncobj
import pysyncobj.tcp_connection as pysyncobj_tcp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from isal import isal_zlib

from mqnode.compression import DEFLATE_FROM_BYTES, compressible

# Fixed, not HIGHEST_PROTOCOL: a newer Python's highest could not be read by older ones.
PICKLE_PROTOCOL = 5
COMPRESS_FROM_BYTES = DEFLATE_FROM_BYTES
TOKEN_VERSION = 0xA1  # a Fernet token starts with "g" (0x67): never mistaken for ours
_HEADER = struct.Struct(">BQ")  # version, pysyncobj's timestamp; authenticated, not secret
_NONCE_BYTES = 12
_KEY_SALT = b"mqnode raft peer messages: AES-256-GCM v1"
_KDF_ITERATIONS = 100_000  # as pysyncobj's for Fernet: the secret may be a passphrase


class AeadEncryptor:
    """pysyncobj's encryptor interface (Fernet's three methods) over AES-256-GCM."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._lock = threading.Lock()
        self._prefix = os.urandom(8)
        self._counter = 0

    def _nonce(self) -> bytes:
        with self._lock:
            self._counter += 1
            if self._counter >= 2**32:
                self._prefix, self._counter = os.urandom(8), 1
            return self._prefix + self._counter.to_bytes(4, "big")

    def encrypt_at_time(self, data: bytes, at: int) -> bytes:
        header = _HEADER.pack(TOKEN_VERSION, at)
        nonce = self._nonce()
        return header + nonce + self._aead.encrypt(nonce, data, header)

    def extract_timestamp(self, token: bytes) -> int:
        """The sender's timestamp, unverified: decrypt() fails if it was altered."""
        return _split(token)[1]

    def decrypt(self, token: bytes) -> bytes:
        header, _, nonce, sealed = _split(token)
        return self._aead.decrypt(nonce, sealed, header)


def _split(token: bytes) -> tuple[memoryview, int, memoryview, memoryview]:
    """(header, timestamp, nonce, sealed): views, as a catch-up batch is megabytes."""
    start = _HEADER.size + _NONCE_BYTES
    if len(token) < start + 16:
        raise ValueError("peer message too short")
    version, at = _HEADER.unpack_from(token)
    if version != TOKEN_VERSION:
        raise ValueError("not an mqnode peer message of this release")
    view = memoryview(token)
    return view[: _HEADER.size], at, view[_HEADER.size : start], view[start:]


def aead_encryptor(password: str | bytes) -> AeadEncryptor:
    """Stands in for pysyncobj's getEncryptor(password) (its `password` setting)."""
    secret = password.encode() if isinstance(password, str) else password
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(), length=32, salt=_KEY_SALT, iterations=_KDF_ITERATIONS
    )
    return AeadEncryptor(kdf.derive(secret))


def stored_zlib(data: bytes) -> bytes:
    """`data` as a zlib stream of stored (uncompressed) blocks: no deflate set-up cost.

    The blocks are views of `data`, joined once: slices would copy each block before
    the join, 0.2 ms more per MiB on the leader for every big batch to every follower."""
    view = memoryview(data)
    parts: list[bytes | memoryview] = [b"\x78\x01"]
    pos = 0
    while True:
        block = view[pos : pos + 0xFFFF]
        pos += len(block)
        final = pos >= len(data)
        parts.append(struct.pack("<BHH", int(final), len(block), len(block) ^ 0xFFFF))
        parts.append(block)
        if final:
            break
    parts.append(struct.pack(">I", isal_zlib.adler32(data)))
    return b"".join(parts)


class _Deflate:
    """What pysyncobj's tcp_connection module calls as `zlib`.

    Only what compresses is deflated. Mail bodies are mostly text (deflate takes
    them to a few percent) or base64 attachments, which deflate at level 1 only to
    ~77%: ~0.15 ms per 100 KB in ISA-L (~3 ms in the system zlib), then ~0.2 ms
    to inflate on each follower, to save a quarter of bytes that cross a LAN.
    `SAMPLES` slices of `SAMPLE_BYTES` spread over the message are deflated first;
    unless they shrink below `DEFLATE_BELOW` of their size the message goes stored.
    A big entry's command (`WireCommand`) arrives here already deflated, so a batch
    of them goes stored.
    """

    @classmethod
    def compress(cls, data: bytes, level: int = -1) -> bytes:
        if len(data) < COMPRESS_FROM_BYTES or not compressible(data):
            return stored_zlib(data)
        return isal_zlib.compress(data, 1)

    decompress = staticmethod(isal_zlib.decompress)


class WireCommand(bytes):
    """A log entry's command that is deflated once, however often it is sent or stored.

    Every follower gets each entry, and a message's pickle differs per connection
    (pysyncobj puts the connection's random key in front), so deflating whole
    messages deflated every big entry once per follower, and again for every
    resend. An entry of `COMPRESS_FROM_BYTES` or more pickles as a call of
    `zlib.decompress` on its deflated bytes (kept on the object, which the
    journal holds in memory until compaction), or as plain bytes when samples of
    it do not compress. Any release unpickles either: the receiver gets `bytes`;
    this release's receiver keeps the deflated bytes as well (`_Unpickler`), and
    every node's journal stores an entry in the form it was sent (logstore.py).
    """

    @classmethod
    def from_deflated(cls, packed: bytes) -> WireCommand:
        """The command `packed` deflates, with `packed` kept (nothing to deflate again)."""
        command = cls(isal_zlib.decompress(packed))
        command.__dict__["deflated"] = packed
        return command

    def deflate_once(self) -> bytes:
        """The deflated command, or b"" when samples of it do not compress; computed once."""
        packed: bytes | None = self.__dict__.get("deflated")
        if packed is None:
            packed = isal_zlib.compress(self, 1) if compressible(self) else b""
            self.__dict__["deflated"] = packed
        return packed

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[object, tuple[Any]]:
        packed = self.deflate_once()
        if packed:
            return (zlib.decompress, (packed,))
        if int(protocol) >= 5:  # the bytes `bytes(self)` pickles as, without that copy
            return (bytes, (pickle.PickleBuffer(self),))
        return (bytes, (bytes(self),))


def _sent_stored(*args: Any) -> bytes:
    """What a pickle's `bytes(...)` call gives, but a big command (sent stored, see
    `WireCommand.__reduce__`) as a `WireCommand` that knows it does not compress."""
    if len(args) == 1 and type(args[0]) is bytes and len(args[0]) >= COMPRESS_FROM_BYTES:
        command = WireCommand(args[0])
        command.__dict__["deflated"] = b""
        return command
    return bytes(*args)


class _Unpickler(pickle.Unpickler):
    """pickle's loader, with a big entry's `zlib.decompress` (see `WireCommand`) run in ISA-L.

    The pickle names the stdlib function, which every release has; this release inflates
    it in ISA-L instead (2.6 ms -> 1.2 ms per MiB of text, on every follower) into a
    `WireCommand` that keeps the deflated bytes, which the journal stores as they came.
    A big entry sent stored (a call of `bytes`) becomes one that is not sampled again.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "zlib" and name == "decompress":
            return WireCommand.from_deflated
        if module == "builtins" and name == "bytes":
            return _sent_stored
        return super().find_class(module, name)


def loads(data: bytes) -> Any:
    """A peer message's pickle (what pysyncobj's `pickle.loads` reads) as its object."""
    return _Unpickler(io.BytesIO(data)).load()


def wire_command(command: bytes) -> bytes:
    """`command` as the journal keeps it in memory: a `WireCommand` when it is big."""
    if len(command) < COMPRESS_FROM_BYTES or type(command) is WireCommand:
        return command
    return WireCommand(command)


def install() -> None:
    """Swap pysyncobj's pickling, encryption and compression (see the module doc); idempotent."""
    # pysyncobj.pickle.dumps reads its module global `__protocol` at every call.
    setattr(pysyncobj_pickle, "__protocol", PICKLE_PROTOCOL)
    # SyncObj.__init__ calls the module global getEncryptor(conf.password).
    pysyncobj_syncobj.getEncryptor = aead_encryptor
    pysyncobj_tcp.zlib = _Deflate
