"""GuardedConnection's send step: a bytearray consumed from the front, nothing lost.

A real connection over a loopback socket pair with pysyncobj's poller: a frame of
a few megabytes leaves in many partial sends (the socket's buffer is small), and
the peer reads back exactly what was sent, in order.
"""

from __future__ import annotations

import os
import socket
import zlib

import pysyncobj.pickle as pickle
from pysyncobj.poller import createPoller

from mqnode.raft.guarded import GuardedConnection
from mqnode.raft.internals import ConnectionInternals
from mqnode.raft.wire import install as install_framing


def test_big_frames_leave_whole_and_in_order_through_partial_sends() -> None:
    install_framing()
    poller = createPoller("auto")
    mine, peer = socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    mine.setblocking(False)
    conn = GuardedConnection(poller, socket=mine, timeout=60.0)
    raw = ConnectionInternals(conn)
    try:
        # random bytes: stored, not deflated (wire.py), so megabytes wait to be sent
        messages = [{"n": i, "data": os.urandom(3 * 1024 * 1024 + i)} for i in range(3)]
        for m in messages:
            conn.send(m)
        assert isinstance(raw.write_buffer, bytearray)
        assert 0 < len(raw.write_buffer) < sum(len(m["data"]) for m in messages)
        frames: list[bytes] = []
        peer.setblocking(False)
        pending = b""
        for _ in range(10_000):
            poller.poll(0.001)  # a WRITE event sends what the socket takes
            try:
                pending += peer.recv(1 << 20)
            except BlockingIOError:
                pass
            while len(pending) >= 4:
                length = int.from_bytes(pending[:4], "little", signed=True)
                if len(pending) < 4 + length:
                    break
                frames.append(pending[4 : 4 + length])
                pending = pending[4 + length :]
            if len(frames) == len(messages):
                break
        assert len(frames) == len(messages) and not raw.write_buffer
        decoded = [pickle.loads(zlib.decompress(f)) for f in frames]
        assert decoded == messages
    finally:
        conn.disconnect()
        peer.close()
