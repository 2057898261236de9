"""Whoever reaches a node's Raft port without the cluster secret cannot depose its leader.

Against the leader of a real 3-node cluster, over real TCP connections: a frame
announcing 2^31-1 bytes followed by a stream of data, random bytes on several
connections, frames replayed from an earlier connection (made here with the
cluster secret, as a captured peer's would be), a pickle that would create a
file if anything unpickled it, and dozens of connections that never finish the
key exchange. After each: the leader keeps its role and term, its memory stays
bounded, nothing executed, and mail is still answered 250 on every node.
Every attacking loop is bounded in bytes and time (guarded.py has the limits).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqnode.raft.guarded import PRE_AUTH_MAX_FRAME_BYTES
from mqnode.raft.transport import HANDSHAKE_DEADLINE_S, MAX_UNAUTHENTICATED
from mqnode.raft.wire import aead_encryptor, stored_zlib
from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cluster import SECRET, Cluster, running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STREAM_MAX_BYTES = 64 * 2**20
STREAM_MAX_S = 20.0
RSS_GROWTH_MAX_BYTES = 48 * 2**20
IDLE_CONNECTIONS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("hostile")) as c:
        yield c


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _frame(payload: bytes) -> bytes:
    return struct.pack("i", len(payload)) + payload


def _sealed(obj: Any, secret: str = SECRET) -> bytes:
    token = aead_encryptor(secret).encrypt_at_time(
        stored_zlib(pickle.dumps(obj, protocol=5)), int(time.monotonic())
    )
    return _frame(token)


def _connect(c: Cluster, i: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", c.nodes[i].raft_port), timeout=5)
    s.settimeout(5)
    return s


def _closed_by_peer(s: socket.socket, wait_s: float = 5.0) -> bool:
    """Whether the node closed the connection within wait_s (reads and drops its bytes)."""
    s.settimeout(0.2)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _read_frame(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    (length,) = struct.unpack("i", head)
    data = b""
    while len(data) < length:
        data += s.recv(length - len(data))
    return data


def _leadership(c: Cluster) -> tuple[int, int]:
    lead = c.wait_for_leader()
    return lead, int(c.status(lead)["term"])


def _still_serving(c: Cluster, lead: int, term: int, rss_before: int) -> None:
    """The same leader in the same term, bounded memory, mail accepted everywhere."""
    assert _leadership(c) == (lead, term), c.logs()
    proc = c.nodes[lead].proc
    assert proc is not None
    grown = _rss_bytes(proc.pid) - rss_before
    assert grown < RSS_GROWTH_MAX_BYTES, f"leader RSS grew by {grown / 2**20:.0f} MiB"
    acked: dict[str, str] = {}
    for i in range(len(c.nodes)):
        offer_ok(c, i, acked)
    c.wait_applied_equal()
    assert_acked_once(c, acked)


def _baseline(c: Cluster) -> tuple[int, int, int]:
    lead, term = _leadership(c)
    proc = c.nodes[lead].proc
    assert proc is not None
    return lead, term, _rss_bytes(proc.pid)


def test_a_huge_frame_announcement_is_refused_at_its_header(cluster: Cluster) -> None:
    lead, term, rss = _baseline(cluster)
    s = _connect(cluster, lead)
    sent = 0
    chunk = os.urandom(2**20)
    started = time.monotonic()
    try:
        s.sendall(struct.pack("i", 2**31 - 1))
        while sent < STREAM_MAX_BYTES and time.monotonic() - started < STREAM_MAX_S:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # closed by the node: what we want
    finally:
        s.close()
    assert sent < STREAM_MAX_BYTES, "the node read a 64 MiB stream for a 2 GiB frame"
    _still_serving(cluster, lead, term, rss)


def test_random_bytes_on_many_connections_cost_nothing(cluster: Cluster) -> None:
    lead, term, rss = _baseline(cluster)
    socks = [_connect(cluster, lead) for _ in range(8)]
    for s in socks:
        try:
            s.sendall(os.urandom(256 * 1024))
        except OSError:
            pass
    assert all(_closed_by_peer(s) for s in socks)
    for s in socks:
        s.close()
    _still_serving(cluster, lead, term, rss)


def test_replayed_frames_of_a_peer_never_authenticate(cluster: Cluster) -> None:
    """Frames sealed with the real secret, replayed on a new connection: the key exchange
    binds every frame after the first to that connection, so the replay is refused, and
    until it is complete a frame may not announce more than the small pre-auth limit."""
    lead, term, rss = _baseline(cluster)
    first = _sealed(os.urandom(32))
    a = _connect(cluster, lead)
    a.sendall(first)
    their_key = pickle.loads(zlib.decompress(aead_encryptor(SECRET).decrypt(_read_frame(a))))
    second = _sealed((their_key, "127.0.0.1:1"))
    a.sendall(second)
    assert _closed_by_peer(a), "an unknown member address was kept"
    a.close()

    b = _connect(cluster, lead)
    b.sendall(first + second)
    assert _closed_by_peer(b), "a replayed frame was taken"
    b.close()

    c = _connect(cluster, lead)
    c.sendall(first + struct.pack("i", PRE_AUTH_MAX_FRAME_BYTES + 1))
    assert _closed_by_peer(c), "a large frame was buffered before authentication"
    c.close()
    _still_serving(cluster, lead, term, rss)


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_pickle_payload_never_executes(cluster: Cluster, tmp_path: Path) -> None:
    lead, term, rss = _baseline(cluster)
    target = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(target)), protocol=2)
    attempts = [
        _frame(stored_zlib(payload)),  # as pysyncobj without a password would read it
        _frame(payload),
        _sealed(_CreatesFile(str(target)), secret="not-the-cluster-secret-0123456789abcdef"),
    ]
    for raw in attempts:
        s = _connect(cluster, lead)
        s.sendall(raw)
        assert _closed_by_peer(s)
        s.close()
    assert not target.exists(), "a peer's pickle was executed"
    _still_serving(cluster, lead, term, rss)


def test_connections_that_never_authenticate_are_bounded_and_expire(cluster: Cluster) -> None:
    lead, term, rss = _baseline(cluster)
    socks = [_connect(cluster, lead) for _ in range(IDLE_CONNECTIONS)]
    try:
        time.sleep(0.5)
        # The oldest beyond the bound are closed at once; the cluster keeps working.
        early = socks[: IDLE_CONNECTIONS - MAX_UNAUTHENTICATED]
        assert all(_closed_by_peer(s, wait_s=2.0) for s in early)
        _still_serving(cluster, lead, term, rss)
        rest = socks[IDLE_CONNECTIONS - MAX_UNAUTHENTICATED :]
        assert all(_closed_by_peer(s, wait_s=HANDSHAKE_DEADLINE_S + 3) for s in rest)
    finally:
        for s in socks:
            s.close()
