"""GuardedConnection: pysyncobj's TCP connection with a bounded, linear read path.

Anyone who reaches the Raft port talks to pysyncobj's reader before anything
is decrypted. Its own reader (0.3.17, tcp_connection.py) trusts the 4-byte
length a frame announces, keeps reading for as long as the socket has bytes,
and grows its buffer with `bytes +=` (a copy per read, quadratic): one
connection announcing a 2 GiB frame and streaming data stalled the tick
thread for 17-20 s and tripled the node's memory, and the cluster elected
another leader. This subclass replaces the three private methods of that read
path, and the send step of its write path:

* A frame may announce at most `PRE_AUTH_MAX_FRAME_BYTES` until the
  connection is authenticated, `MAX_FRAME_BYTES` after; a longer (or
  negative) announcement closes the connection as soon as its 4 bytes arrive.
  Authenticated means a frame decrypted with the cluster secret *and* carried
  the random key this side chose for the connection (pysyncobj's key
  exchange), so a replay of another connection's frames never counts.
* One poll event reads at most `READ_BUDGET_BYTES`; the poller is
  level-triggered, so the rest is read at the next poll, after the tick did
  its work.
* The buffer is a bytearray, consumed from the front (amortised O(1) in
  CPython): growth is linear.
* The write buffer is a bytearray too. pysyncobj's own copies what is left
  after every `send()` the kernel takes part of (`buf = buf[sent:]`): with a
  follower catching up, or an append batch of megabytes, the leader's tick
  thread copied the pending bytes again per ~128 KiB that left.

Sizes: a legitimate peer's largest frame is an append_entries batch
(`settings.APPEND_BATCH_BYTES`, 2 MiB, plus one entry under it; an earlier
release's 64 KiB plus one entry) or a 64 KiB snapshot chunk, under 4.1 MiB
after pickling and framing; `MAX_FRAME_BYTES` leaves room above that. Memory per
connection stays under cap + budget. The number of connections that have not
authenticated, and how long they may take, is bounded by the transport
(transport.py).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

import pysyncobj.tcp_connection as pysyncobj_tcp
import pysyncobj.tcp_server as pysyncobj_tcp_server
import pysyncobj.transport as pysyncobj_transport
from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.tcp_connection import TcpConnection

from mqnode.raft import wire
from mqnode.raft.internals import ConnectionInternals, install_read_path, install_write_path

PRE_AUTH_MAX_FRAME_BYTES = 64 * 1024
MAX_FRAME_BYTES = 16 * 1024 * 1024
READ_BUDGET_BYTES = 1024 * 1024
_LENGTH = struct.Struct("i")  # pysyncobj's frame header: native int, signed


class GuardedConnection(TcpConnection):  # type: ignore[misc]
    """A TcpConnection whose reader bounds what an unauthenticated peer can cost."""

    recvLastTimestamp: int  # pysyncobj's, set in its __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._mq_buf = bytearray()
        self._mq_budget = 0
        self.mq_authenticated = False
        # Told why a connection was closed for its framing (the transport logs it).
        self.mq_on_refused: Callable[[str], None] = lambda why: None
        self._mq_raw = ConnectionInternals(self)  # one per connection, not per read
        super().__init__(*args, **kwargs)

    def connect(self, host: str, port: int) -> bool:
        self._mq_reset()
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        self._mq_reset()
        super().disconnect()

    def _mq_reset(self) -> None:
        self._mq_buf = bytearray()
        self.mq_authenticated = False

    def mq_max_frame(self) -> int:
        if self.mq_authenticated or not self.encryptor:  # no secret: nothing to wait for
            return MAX_FRAME_BYTES
        return PRE_AUTH_MAX_FRAME_BYTES

    def _mq_refuse(self, why: str) -> None:
        self.disconnect()
        self.mq_on_refused(why)

    def _mq_header_ok(self) -> bool:
        """Whether the frame at the head of the buffer announces an acceptable length."""
        if len(self._mq_buf) < _LENGTH.size:
            return True
        length = _LENGTH.unpack_from(self._mq_buf)[0]
        limit = self.mq_max_frame()
        if 0 <= length <= limit:
            return True
        state = "authenticated" if self.mq_authenticated else "unauthenticated"
        self._mq_refuse(f"a frame of {length} bytes announced (limit {limit}, {state})")
        return False

    # -- pysyncobj's private read path (tcp_connection.py), replaced ---------------------
    # install_read_path (internals.py) puts these three under TcpConnection's private names.
    def mq_try_read_buffer(self) -> None:
        self._mq_budget = READ_BUDGET_BYTES
        while self.mq_process_read():
            pass
        self._mq_raw.last_read_time = _pysyncobj_now()

    def mq_process_read(self) -> bool:
        raw = self._mq_raw
        sock = raw.socket
        try:
            incoming = sock.recv(raw.recv_buffer_size)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or not incoming:
            self.disconnect()
            return False
        self._mq_buf += incoming
        self._mq_budget -= len(incoming)
        return self._mq_header_ok() and self._mq_budget > 0

    def mq_process_parse_message(self) -> Any:
        buf = self._mq_buf
        if len(buf) < _LENGTH.size or not self._mq_header_ok():
            return None
        length = _LENGTH.unpack_from(buf)[0]
        end = _LENGTH.size + length
        if len(buf) < end:
            return None
        data = bytes(memoryview(buf)[_LENGTH.size : end])  # one copy of a frame, not two
        del buf[:end]
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                if stamp < self.recvLastTimestamp:
                    raise ValueError("timestamp went back")
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            # pysyncobj's tcp_connection module global, which wire.py swaps for its codec.
            message = wire.loads(pysyncobj_tcp.zlib.decompress(data))
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("not this connection's key")
                self.mq_authenticated = True
        except Exception:
            self.disconnect()  # as pysyncobj does: the transport logs a failed decrypt
            return None
        return message

    # -- pysyncobj's private send step, replaced (install_write_path) ----------------------
    def mq_process_send(self) -> bool:
        raw = self._mq_raw
        buf = raw.write_buffer
        if not buf:
            return False
        try:
            sent = raw.socket.send(buf)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sent < 0:
            self.disconnect()
            return False
        if sent == 0:
            return False
        del buf[:sent]  # amortised O(1) at the front of a bytearray
        return True


install_write_path(GuardedConnection, GuardedConnection.mq_process_send)
install_read_path(
    GuardedConnection,
    GuardedConnection.mq_try_read_buffer,
    GuardedConnection.mq_process_read,
    GuardedConnection.mq_process_parse_message,
)


def install() -> None:
    """Make pysyncobj build GuardedConnections for incoming and outgoing links; idempotent."""
    pysyncobj_tcp_server.TcpConnection = GuardedConnection
    pysyncobj_transport.TcpConnection = GuardedConnection
