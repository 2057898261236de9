"""DeferringTransport: pysyncobj's TCP transport, holding acks until they are durable.

Follower acknowledgements (`next_node_idx`) wait in `release_deferred()`
until the tick's journal flush; a mismatch answer skips the whole
conflicting term; a success never rewinds the leader's next index past
batches already in flight; and `mq_blocked` drops traffic to and from given
peers (the fault suite's partition). Messages are encrypted with the
cluster secret by pysyncobj (its `password` setting).
"""

from __future__ import annotations

from typing import Any

from pysyncobj.transport import TCPTransport


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
        super().__init__(syncObj, selfNode, otherNodes)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self.mq_blocked and getattr(node, "address", None) in self.mq_blocked:
            return
        next_index = self._syncObj._SyncObj__raftNextIndex
        sent_up_to = next_index.get(node)
        super()._onMessageReceived(node, message)
        if message.get("type") == "next_node_idx" and message.get("reset"):
            self.mq_resend = True  # retry at once, not at the next heartbeat
        # pysyncobj sets nextIndex to the acked position on every success, rewinding past
        # batches already in flight, which it then re-sends and the follower truncates and
        # re-appends. A success only confirms a prefix: keep what was already sent.
        if (
            message.get("type") == "next_node_idx"
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
        first, last = journal[0][1], journal[-1][1]
        if not first < idx <= last:
            return message
        term = journal[idx - first][2]
        pos = idx - first
        # Never below what this node applied: applied entries are committed, so they
        # match the leader's (Log Matching). Asking for them again made pysyncobj
        # truncate and re-append applied entries ("truncating already-applied").
        floor = min(max(journal.applied_index() + 1 - first, 1), pos)
        while pos > floor and journal[pos - 1][2] == term:
            pos -= 1
        return {**message, "next_node_idx": journal[pos][1]}

    def release_deferred(self) -> None:
        deferred, self._mq_deferred = self._mq_deferred, []
        for node, message in deferred:
            super().send(node, message)
