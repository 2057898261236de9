"""The one door to pysyncobj's private state: every name-mangled attribute mqnode reads or writes.

pysyncobj 0.3.17 keeps what Raft needs (log, term, vote, commit and applied
index, election deadline, next and match index, waiting callbacks) in
name-mangled attributes, and the workarounds of docs/design/replication.md
must read and sometimes write them. They are reached here and nowhere else:
`SyncInternals` wraps a SyncObj, `ConnectionInternals` a TcpConnection, and
`READ_PATH_OVERRIDES` and `WRITE_PATH_OVERRIDES` name the private methods of
TcpConnection that raft/guarded.py replaces. `INTERNALS["TCPTransport"]` names the
protected hooks and state that raft/transport.py's subclass uses. What pysyncobj
offers publicly
(`selfNode`, `otherNodes`, `raftLastApplied`, `raftCommitIndex`,
`raftCurrentTerm`, `hasQuorum`, `_getLeader()`, `_isLeader()`, `destroy()`)
is used directly by the callers.

Importing this module checks that the installed pysyncobj is exactly
`PINNED_VERSION` (ImportError otherwise: these names are not an API and
change between releases). `INTERNALS` lists every private name used here;
tests/unit/test_pysyncobj_internals.py builds a real SyncObj and
TcpConnection and fails, naming the attribute, if any of them is gone.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

PINNED_VERSION = "0.3.17"

_installed = metadata.version("pysyncobj")
if _installed != PINNED_VERSION:
    raise ImportError(
        f"mqnode needs pysyncobj {PINNED_VERSION} exactly (it reaches into its internals: "
        f"mqnode/raft/internals.py); pysyncobj {_installed} is installed"
    )

# Private names per class, as Python mangles them; methods and instance attributes alike.
INTERNALS: dict[str, tuple[str, ...]] = {
    "SyncObj": (
        "_SyncObj__raftState",
        "_SyncObj__raftLeader",
        "_SyncObj__raftLog",
        "_SyncObj__raftCurrentTerm",
        "_SyncObj__votedForNodeId",
        "_SyncObj__raftCommitIndex",
        "_SyncObj__raftLastApplied",
        "_SyncObj__needLoadDumpFile",
        "_SyncObj__raftElectionDeadline",
        "_SyncObj__raftNextIndex",
        "_SyncObj__raftMatchIndex",
        "_SyncObj__lastResponseTime",
        "_SyncObj__noopIDx",
        "_SyncObj__transferInProgress",
        "_SyncObj__transport",
        "_SyncObj__otherNodes",
        "_SyncObj__commandsWaitingCommit",
        "_SyncObj__commandsWaitingReply",
        "_SyncObj__getCurrentLogIndex",
        "_SyncObj__getCurrentLogTerm",
        "_SyncObj__generateRaftTimeout",
        "_SyncObj__sendAppendEntries",
        "_SyncObj__updateClusterConfiguration",
        "_checkCommandsToApply",
        "_poller",
    ),
    # Not name-mangled but protected: the hooks DeferringTransport (raft/transport.py)
    # overrides and the state it reads as a subclass. A renamed hook would silently
    # never be called, so the canary checks these too.
    "TCPTransport": (
        "_onNewIncomingConnection",
        "_onOutgoingConnected",
        "_onOutgoingMessageReceived",
        "_onDisconnected",
        "_onMessageReceived",
        "_onIncomingMessageReceived",
        "_nodeAddrToNode",
        "_connToNode",
        "_connections",
        "_syncObj",
    ),
    "TcpConnection": (
        "_TcpConnection__socket",
        "_TcpConnection__lastReadTime",
        "_TcpConnection__recvBufferSize",
        "_TcpConnection__tryReadBuffer",
        "_TcpConnection__processRead",
        "_TcpConnection__processParseMessage",
        "_TcpConnection__writeBuffer",
        "_TcpConnection__processSend",
    ),
}

# TcpConnection's private read path, replaced by GuardedConnection (raft/guarded.py):
# Python resolves `self.__tryReadBuffer()` inside TcpConnection to these names.
READ_PATH_OVERRIDES = (
    "_TcpConnection__tryReadBuffer",
    "_TcpConnection__processRead",
    "_TcpConnection__processParseMessage",
)


# TcpConnection's private send step, replaced by GuardedConnection (raft/guarded.py).
WRITE_PATH_OVERRIDES = ("_TcpConnection__processSend",)


def install_write_path(cls: type, process_send: Any) -> None:
    """Put `cls`'s send step under TcpConnection's private name (raft/guarded.py)."""
    setattr(cls, WRITE_PATH_OVERRIDES[0], process_send)


def install_read_path(cls: type, try_read: Any, process_read: Any, parse: Any) -> None:
    """Put `cls`'s own methods under TcpConnection's private read-path names, so that
    TcpConnection's code calls them (raft/guarded.py)."""
    for name, method in zip(READ_PATH_OVERRIDES, (try_read, process_read, parse), strict=True):
        setattr(cls, name, method)


class SyncInternals:
    """A SyncObj's private Raft state, by name (see the module docstring). Tick thread only."""

    __slots__ = ("_s",)

    def __init__(self, sync: Any) -> None:
        self._s = sync

    # -- role, leader, members ------------------------------------------------------------
    @property
    def state(self) -> int:
        return int(self._s._SyncObj__raftState)

    @property
    def leader(self) -> Any:
        return self._s._SyncObj__raftLeader

    @property
    def other_nodes(self) -> set[Any]:
        """The live set (not a copy, unlike the public `otherNodes`): read it, never keep it."""
        return self._s._SyncObj__otherNodes  # type: ignore[no-any-return]

    @property
    def transport(self) -> Any:
        return self._s._SyncObj__transport

    @property
    def transfer_in_progress(self) -> bool:
        return bool(self._s._SyncObj__transferInProgress)

    @property
    def last_response_time(self) -> dict[Any, float]:
        return self._s._SyncObj__lastResponseTime  # type: ignore[no-any-return]

    @property
    def noop_index(self) -> int:
        return int(self._s._SyncObj__noopIDx)

    def update_cluster_configuration(self, others: list[Any]) -> None:
        self._s._SyncObj__updateClusterConfiguration(others)

    # -- log, term, vote, indexes ---------------------------------------------------------
    def adopt_log(self, log: Any, term: int, voted_for: Any, commit: int, applied: int) -> None:
        """Swap our journal in and set what pysyncobj derived from its own (node.py)."""
        s = self._s
        s._SyncObj__raftLog = log
        s._SyncObj__raftCurrentTerm = term
        s._SyncObj__votedForNodeId = voted_for
        s._SyncObj__raftCommitIndex = commit
        s._SyncObj__raftLastApplied = applied
        s._SyncObj__needLoadDumpFile = False

    @property
    def voted_for(self) -> Any:
        return self._s._SyncObj__votedForNodeId

    @property
    def last_applied(self) -> int:
        return int(self._s._SyncObj__raftLastApplied)

    @last_applied.setter
    def last_applied(self, index: int) -> None:
        self._s._SyncObj__raftLastApplied = index

    def last_log_index(self) -> int:
        return int(self._s._SyncObj__getCurrentLogIndex())

    def last_log_term(self) -> int:
        return int(self._s._SyncObj__getCurrentLogTerm())

    @property
    def next_index(self) -> dict[Any, int]:
        return self._s._SyncObj__raftNextIndex  # type: ignore[no-any-return]

    @property
    def match_index(self) -> dict[Any, int]:
        return self._s._SyncObj__raftMatchIndex  # type: ignore[no-any-return]

    # -- elections ------------------------------------------------------------------------
    @property
    def election_deadline(self) -> float:
        return float(self._s._SyncObj__raftElectionDeadline)

    @election_deadline.setter
    def election_deadline(self, at: float) -> None:
        self._s._SyncObj__raftElectionDeadline = at

    def random_election_timeout(self) -> float:
        return float(self._s._SyncObj__generateRaftTimeout())

    # -- sending and commands -------------------------------------------------------------
    def send_append_entries(self) -> None:
        self._s._SyncObj__sendAppendEntries()

    def check_commands_to_apply(self) -> None:
        """Append (leader) or forward (follower) the queued commands now, not next tick."""
        self._s._checkCommandsToApply()

    @property
    def poller(self) -> Any:
        return self._s._poller

    @property
    def commands_waiting_commit(self) -> dict[int, list[tuple[int, Any]]]:
        return self._s._SyncObj__commandsWaitingCommit  # type: ignore[no-any-return]

    @property
    def commands_waiting_reply(self) -> dict[int, Any]:
        return self._s._SyncObj__commandsWaitingReply  # type: ignore[no-any-return]


class ConnectionInternals:
    """A TcpConnection's private socket and read state (transport.py, guarded.py)."""

    __slots__ = ("_c",)

    def __init__(self, conn: Any) -> None:
        self._c = conn

    @property
    def socket(self) -> Any:
        return self._c._TcpConnection__socket

    @property
    def last_read_time(self) -> float | None:
        value = getattr(self._c, "_TcpConnection__lastReadTime", None)
        return None if value is None else float(value)

    @last_read_time.setter
    def last_read_time(self, at: float) -> None:
        self._c._TcpConnection__lastReadTime = at

    @property
    def recv_buffer_size(self) -> int:
        return int(self._c._TcpConnection__recvBufferSize)

    @property
    def write_buffer(self) -> bytearray:
        """What waits to be sent, as a bytearray (pysyncobj resets it to bytes on connect
        and disconnect; its `send` appends with `+=`, in place on a bytearray)."""
        buf = self._c._TcpConnection__writeBuffer
        if not isinstance(buf, bytearray):
            buf = self._c._TcpConnection__writeBuffer = bytearray(buf)
        return buf
