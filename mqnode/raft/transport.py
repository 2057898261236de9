"""DeferringTransport: pysyncobj's TCP transport, holding acks until they are durable.

Follower acknowledgements (`next_node_idx`) wait in `release_deferred()`
until the tick's journal flush; a mismatch answer skips the whole
conflicting term; a success never rewinds the leader's next index past
batches already in flight; `mq_blocked` drops traffic to and from given
peers (the fault suite's partition); pre-vote messages go to the RaftNode
(prevote.py), `mq_leader_heard_at` notes the last append_entries pysyncobj
will accept (of our term or later), and a closed connection to the leader
tells the RaftNode to stand soon (prevote.py, W26). Messages are encrypted with the
cluster secret (its `password` setting; AES-GCM, see wire.py); pysyncobj closes a
connection whose messages do not decrypt without a word, so we log both
sides of it, at most once a minute per address: the receiving side (an
incoming connection whose messages failed to decrypt, with the peer's IP),
and the connecting side (the peer closed our connection before answering
the key exchange: of two nodes only the one with the higher address
connects, so each pair has exactly one of each). The connecting side warns
only after two such closes in a row: a peer killed mid-accept does it once.

`keep_alive()` (every tick) also drops an outgoing connection still connecting
after `CONNECT_TIMEOUT_S`, so a link comes back right after a partition heals
rather than at the kernel's next SYN retransmission. It sends a no-op message
to every connected peer about every
second. pysyncobj drops a connection it has read nothing from for
`connectionTimeout`, and checks that only when it next sends: followers never
talk to each other, so after a leader crash the first vote request between
them found the connection stale, was dropped, and the election waited a
whole second timeout (measured: 1.2 s of a 1.4 s failover).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from mqnode.raft.internals import ConnectionInternals, SyncInternals
from mqnode.raft.prevote import PREVOTE, PREVOTE_GRANTED, PREVOTE_REFUSED

log = logging.getLogger("mqnode.raft")

WRONG_SECRET_LOG_EVERY_S = 60.0
# Incoming connections that have not finished the key exchange (guarded.py): at most this
# many at once (the oldest is closed for a new one) and for at most this long. A peer
# finishes it in one round trip.
MAX_UNAUTHENTICATED = 16
HANDSHAKE_DEADLINE_S = 5.0
# An outgoing connection still connecting after this long is dropped and made again. A SYN
# lost in a partition is retried by the kernel with a doubling back-off (1, 2, 4, 8 s...),
# and pysyncobj checks a connection's timeout only on an event of its socket, which a lost
# SYN never brings: after a heal the link came back only at the next retransmission, up
# to ~10 s later (seen in the network-fault runs).
CONNECT_TIMEOUT_S = 1.0
MAX_UNLISTED = 16  # unlisted peers remembered at once (each is a Raft address)
MAX_ADDR_CHARS = 261  # a host name of 255, a colon, a port
HANDSHAKE_FAILURES_BEFORE_WARNING = 2
KEEPALIVE = {"type": "mq_keepalive"}  # pysyncobj ignores message types it does not know
PREVOTE_TYPES = frozenset({PREVOTE, PREVOTE_GRANTED, PREVOTE_REFUSED})  # ours: prevote.py


class _WatchedEncryptor:
    """The encryptor of one incoming connection, remembering a failed decrypt."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.failed = False

    def encrypt_at_time(self, data: bytes, at: int) -> bytes:
        return bytes(self._inner.encrypt_at_time(data, at))

    def extract_timestamp(self, data: bytes) -> int:
        return int(self._watched(self._inner.extract_timestamp, data))

    def decrypt(self, data: bytes) -> bytes:
        return bytes(self._watched(self._inner.decrypt, data))

    def _watched(self, call: Callable[[bytes], Any], data: bytes) -> Any:
        try:
            return call(data)
        except Exception:
            self.failed = True
            raise


def commit_unverified_no_further(message: Any, own_commit: int) -> Any:
    """A snapshot chunk must not advance our commit index over our own log.

    pysyncobj's follower sets its commit index to min(leader's commit, its own
    log end) on every append_entries, also on the chunks of an install-snapshot
    transfer, which carry no prevLogIdx: nothing has checked that our log
    matches the leader's. An ex-leader coming back from a partition with
    uncommitted entries of its old term then applied them as committed and
    answered 250, before the snapshot replaced them: acknowledged mail lost
    (found by tests/fault test_partition_leader_and_heal; pysyncobj then logs
    "raftCommitIndex ... exceeds journal end ... after loading dump"). The
    commit index moves on with the first verified append after the install.
    """
    if (
        isinstance(message, dict)
        and message.get("type") == "append_entries"
        and "serialized" in message
        and "prevLogIdx" not in message
        and isinstance(message.get("commit_index"), int)
        and message["commit_index"] > own_commit
    ):
        return {**message, "commit_index": own_commit}
    return message


class DeferringTransport(TCPTransport):  # type: ignore[misc]
    """Holds back follower acknowledgements until the journal is fsynced.

    Also the fault-injection drop hook: messages to and from peers in
    `mq_blocked` are dropped (a network partition as pysyncobj sees it; a TCP
    proxy cannot do this because peers are identified by announced address).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._mq_deferred: list[tuple[Any, Any]] = []
        self.mq_blocked: frozenset[str] = frozenset()
        self.mq_resend = False
        # Leader: the highest log index a follower's submission got (apply_command_response).
        self.mq_follower_entry = 0
        self.mq_leader_heard_at: float | None = None  # last append_entries pysyncobj accepts
        self._mq_incoming: dict[Any, tuple[str, _WatchedEncryptor]] = {}
        self._mq_handshaking: set[Any] = set()  # outgoing, key exchange not answered yet
        self._mq_warned: dict[str, float] = {}
        self._mq_handshake_failures: dict[str, int] = {}
        self._mq_next_keepalive = 0.0
        self._mq_unauthenticated: dict[Any, float] = {}  # incoming conn -> accepted at
        # Raft address -> when a peer with the cluster secret last introduced itself as a
        # member this node's list does not name (pysyncobj drops such a connection).
        self.mq_unlisted: dict[str, float] = {}
        super().__init__(syncObj, selfNode, otherNodes)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        """Note a peer that passed the key exchange and names itself as a member we do not
        list (a typo in someone's peers, or a removed node still running); pysyncobj then
        closes the connection silently."""
        if (
            conn.sendRandKey  # the key exchange is done: this is its address
            and isinstance(message, str)
            and message != "readonly"
            and message not in self._nodeAddrToNode
            and len(message) <= MAX_ADDR_CHARS
            and (message in self.mq_unlisted or len(self.mq_unlisted) < MAX_UNLISTED)
        ):
            self.mq_unlisted[message] = _pysyncobj_now()
        super()._onIncomingMessageReceived(conn, message)

    def unlisted_peers(self, within_s: float) -> tuple[str, ...]:
        """Peers not in our list that introduced themselves within `within_s`."""
        now = _pysyncobj_now()
        for addr in [a for a, t in self.mq_unlisted.items() if now - t > within_s]:
            del self.mq_unlisted[addr]
        return tuple(sorted(self.mq_unlisted))

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        try:
            peer = str(ConnectionInternals(conn).socket.getpeername()[0])
        except (OSError, AttributeError, IndexError):
            peer = "unknown"
        conn.mq_on_refused = lambda why: self._warn_once(
            peer, "raft: closed a connection from %s: " + why.replace("%", "%%")
        )
        self._bound_unauthenticated(conn)
        if conn.encryptor is None:
            return
        watched = _WatchedEncryptor(conn.encryptor)
        conn.encryptor = watched
        self._mq_incoming[conn] = (peer, watched)

    def _bound_unauthenticated(self, conn: Any) -> None:
        """Track a new incoming connection until it authenticates; close the oldest beyond
        MAX_UNAUTHENTICATED, so idle or hostile connections cannot pile up."""
        pending = self._mq_unauthenticated
        for old in [c for c in pending if c.mq_authenticated or c.fileno() is None]:
            del pending[old]
        pending[conn] = _pysyncobj_now()
        while len(pending) > MAX_UNAUTHENTICATED:
            oldest = min(pending, key=pending.__getitem__)
            del pending[oldest]
            oldest.mq_on_refused("too many connections without the key exchange")
            oldest.disconnect()

    def _expire_handshakes(self, now: float) -> None:
        pending = self._mq_unauthenticated
        for conn, since in list(pending.items()):
            if conn.mq_authenticated or conn.fileno() is None:
                del pending[conn]
            elif now - since > HANDSHAKE_DEADLINE_S:
                del pending[conn]
                conn.mq_on_refused(f"no key exchange within {HANDSHAKE_DEADLINE_S:g} s")
                conn.disconnect()

    def _onOutgoingConnected(self, conn: Any) -> None:
        if self._syncObj.encryptor:
            self._mq_handshaking.add(conn)
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        if conn in self._mq_handshaking:
            self._mq_handshaking.discard(conn)  # it answered: same secret
            node = self._connToNode(conn)
            self._mq_handshake_failures.pop(str(getattr(node, "address", "")), None)
        super()._onOutgoingMessageReceived(conn, message)

    def _onDisconnected(self, conn: Any) -> None:
        sync = self._syncObj
        leader = SyncInternals(sync).leader
        if leader is not None and leader != sync.selfNode and self._connToNode(conn) == leader:
            sync._mq_owner._on_leader_link_lost()  # prevote.py: stand soon
        peer, watched = self._mq_incoming.pop(conn, ("", None))
        if watched is not None and watched.failed:
            self._warn_once(
                peer,
                "raft: dropped a connection from %s: its messages do not decrypt "
                "(wrong cluster secret, an mqnode release before AES-GCM, or not an mqnode peer)",
            )
        if conn in self._mq_handshaking:
            self._mq_handshaking.discard(conn)
            address = str(getattr(self._connToNode(conn), "address", "a peer"))
            failures = self._mq_handshake_failures.get(address, 0) + 1
            if len(self._mq_handshake_failures) >= 1024:
                self._mq_handshake_failures.clear()  # bounded, like _mq_warned
            self._mq_handshake_failures[address] = failures
            if failures >= HANDSHAKE_FAILURES_BEFORE_WARNING:
                self._warn_once(
                    address,
                    "raft: %s closed our connection without answering the key exchange "
                    "(a different cluster secret on one side? its log says so)",
                )
        super()._onDisconnected(conn)

    def last_heard(self, nodes: Any) -> dict[str, float | None]:
        """Seconds since each peer's connection last delivered bytes; None: not connected."""
        now = _pysyncobj_now()
        out: dict[str, float | None] = {}
        for node in nodes:
            conn = self._connections.get(node)
            connected = conn is not None and conn.state == CONNECTION_STATE.CONNECTED
            read_at = None if conn is None else ConnectionInternals(conn).last_read_time
            out[str(node.address)] = round(now - read_at, 3) if connected and read_at else None
        return out

    def disconnect(self, addresses: frozenset[str]) -> None:
        """Close the connections with these peer addresses now (fault injection)."""
        for node, conn in list(self._connections.items()):
            if getattr(node, "address", None) in addresses:
                conn.disconnect()

    def keep_alive(self, every_s: float) -> None:
        """Send a no-op to each connected peer every `every_s` (see the module docstring)."""
        now = _pysyncobj_now()
        if self._mq_unauthenticated:
            self._expire_handshakes(now)
        self._expire_connecting(now)
        if now < self._mq_next_keepalive:
            return
        self._mq_next_keepalive = now + every_s
        for node, conn in list(self._connections.items()):
            if conn.state == CONNECTION_STATE.CONNECTED:
                self.send(node, KEEPALIVE)

    def _expire_connecting(self, now: float) -> None:
        """Drop outgoing connections stuck connecting (CONNECT_TIMEOUT_S); pysyncobj makes
        a new one within its retry time, with a fresh SYN."""
        for conn in list(self._connections.values()):
            if conn.state != CONNECTION_STATE.CONNECTING:
                continue
            started = ConnectionInternals(conn).last_read_time  # set when connect() began
            if started is not None and now - started > CONNECT_TIMEOUT_S:
                conn.disconnect()

    def _warn_once(self, key: str, fmt: str) -> None:
        """Log `fmt % key` at most once a minute per key (a peer retries every half second)."""
        now = _pysyncobj_now()
        last = self._mq_warned.get(key)
        if last is not None and now - last < WRONG_SECRET_LOG_EVERY_S:
            return
        if len(self._mq_warned) >= 1024:  # many addresses: forget, stay bounded
            self._mq_warned.clear()
        self._mq_warned[key] = now
        log.warning(fmt, key)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self.mq_blocked and getattr(node, "address", None) in self.mq_blocked:
            return
        kind = message.get("type")
        if kind in PREVOTE_TYPES:
            self._syncObj._mq_owner._on_prevote_message(node, message)
            return
        if kind == "append_entries":
            term = message.get("term", -1)
            if term >= self._syncObj.raftCurrentTerm:
                self.mq_leader_heard_at = _pysyncobj_now()  # a leader of our term or later
            elif isinstance(term, int):
                self._syncObj._mq_owner._on_older_leader(node, term)  # prevote.py
        next_index = SyncInternals(self._syncObj).next_index
        sent_up_to = next_index.get(node)
        message = commit_unverified_no_further(message, self._syncObj.raftCommitIndex)
        super()._onMessageReceived(node, message)
        if kind == "request_vote":
            self._syncObj._mq_after_vote_request(message)
        if kind == "next_node_idx" and message.get("reset"):
            self.mq_resend = True  # retry at once, not at the next heartbeat
        # pysyncobj sets nextIndex to the acked position on every success, rewinding past
        # batches already in flight, which it then re-sends and the follower truncates and
        # re-appends. A success only confirms a prefix: keep what was already sent.
        if (
            kind == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
            and sent_up_to is not None
            and next_index.get(node, 0) < sent_up_to
        ):
            next_index[node] = sent_up_to

    def send(self, node: Any, message: Any) -> bool:
        if self.mq_blocked and getattr(node, "address", None) in self.mq_blocked:
            return False
        if message.get("type") == "next_node_idx" and message.get("reset"):
            message = self._skip_conflicting_term(message)
        if message.get("type") == "next_node_idx" and self._syncObj._mq_journal.dirty:
            self._mq_deferred.append((node, message))
            return True
        if message.get("type") == "append_entries" and (
            message.get("entries") or "transmission" in message
        ):
            self._syncObj._mq_journal.sent_unflushed = True  # any path: paced, heartbeat, resend
        if message.get("type") == "apply_command_response" and "log_idx" in message:
            self.mq_follower_entry = max(self.mq_follower_entry, int(message["log_idx"]))
        return bool(super().send(node, message))

    def _skip_conflicting_term(self, message: dict[str, Any]) -> dict[str, Any]:
        """Follower side: answer a log mismatch with the first index of the conflicting term.

        pysyncobj backs off one index per round trip (and the leader waits for its next
        heartbeat to retry), so a returning ex-leader with hundreds of uncommitted
        entries took tens of seconds to rejoin. Raft's usual optimisation (thesis
        5.3): skip the whole conflicting term at once.
        """
        journal = self._syncObj._mq_journal
        idx = message.get("next_node_idx")
        if not isinstance(idx, int) or len(journal) < 2:
            return message
        first, last = journal.index_at(0), journal.index_at(-1)
        if not first < idx <= last:
            return message
        term = journal.term_at(idx - first)
        pos = idx - first
        # Never below what this node applied: applied entries are committed, so they
        # match the leader's (Log Matching). Asking for them again made pysyncobj
        # truncate and re-append applied entries ("truncating already-applied").
        floor = min(max(journal.applied_index() + 1 - first, 1), pos)
        while pos > floor and journal.term_at(pos - 1) == term:
            pos -= 1
        return {**message, "next_node_idx": journal.index_at(pos)}

    def release_deferred(self) -> None:
        deferred, self._mq_deferred = self._mq_deferred, []
        for node, message in deferred:
            super().send(node, message)
