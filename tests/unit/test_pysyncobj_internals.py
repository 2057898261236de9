"""The canary for mqnode/raft/internals.py: every pysyncobj private name we use still exists.

A real SyncObj and a real TcpConnection are built (no tick runs; the SyncObj binds a
free loopback port: a fixed one was taken by a parallel test run's other worker);
each name of `INTERNALS` must be there, and a missing one fails naming it, so a
pysyncobj upgrade that renames anything stops here instead of in production.
"""

from __future__ import annotations

from importlib import metadata

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from mqnode.devtools.localports import free_loopback_ports
from mqnode.raft import internals
from mqnode.raft.guarded import GuardedConnection


def _free_addr() -> str:
    return f"127.0.0.1:{free_loopback_ports(1)[0]}"


def test_the_pinned_version_is_installed() -> None:
    assert metadata.version("pysyncobj") == internals.PINNED_VERSION


@pytest.mark.parametrize("name", internals.INTERNALS["SyncObj"])
def test_syncobj_still_has(name: str) -> None:
    sync = SyncObj(_free_addr(), [], SyncObjConf(autoTick=False))
    try:
        assert hasattr(sync, name), f"pysyncobj.SyncObj has no {name} any more"
    finally:
        sync.destroy()


@pytest.mark.parametrize("name", internals.INTERNALS["TcpConnection"])
def test_tcp_connection_still_has(name: str) -> None:
    conn = TcpConnection(createPoller("auto"))
    assert hasattr(conn, name), f"pysyncobj TcpConnection has no {name} any more"


@pytest.mark.parametrize("name", internals.INTERNALS["TCPTransport"])
def test_tcp_transport_still_has(name: str) -> None:
    sync = SyncObj(_free_addr(), [], SyncObjConf(autoTick=False))
    try:
        transport = internals.SyncInternals(sync).transport
        assert isinstance(transport, TCPTransport)
        assert hasattr(transport, name), f"pysyncobj TCPTransport has no {name} any more"
    finally:
        sync.destroy()


def test_the_guarded_read_path_is_what_tcp_connection_calls() -> None:
    for name in internals.READ_PATH_OVERRIDES:
        assert getattr(GuardedConnection, name) is not getattr(TcpConnection, name), name
    first = getattr(GuardedConnection, internals.READ_PATH_OVERRIDES[0])
    assert first is GuardedConnection.mq_try_read_buffer


def test_the_accessors_read_a_real_syncobj() -> None:
    sync = SyncObj(_free_addr(), ["127.0.0.1:2"], SyncObjConf(autoTick=False))
    try:
        raw = internals.SyncInternals(sync)
        assert raw.state == 0 and raw.leader is None  # a follower that knows no leader
        assert [n.address for n in raw.other_nodes] == ["127.0.0.1:2"]
        assert raw.last_log_index() >= 0 and raw.commands_waiting_reply == {}
        raw.election_deadline = 12.5
        assert raw.election_deadline == 12.5
    finally:
        sync.destroy()
