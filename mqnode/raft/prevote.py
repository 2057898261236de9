"""Pre-vote (Raft thesis 9.6): stand for election only when a majority would vote.

pysyncobj has no pre-vote. A follower that stops hearing from the leader
while still connected to some peer raises its term and asks for votes at
every election timeout. Measured on a 3-node cluster (fault partition, no
load): a follower cut off for 3 s came back at term 9 and forced an election
on a healthy cluster; one cut off from the leader only won an election
through the other follower, while the old leader still led its term for 3 s.
Each costs the cluster an election: SMTP clients get 451 meanwhile.

How. When pysyncobj's election timer runs out, the tick thread holds it back
(`PreVoteGate.gate_election`) and sends `mq_prevote` with its last log term
and index to the voting members. A member grants (`grants`) when it is not
the leader, has not heard from a leader for the minimum election timeout
(Raft's rule: a leader heard since then is alive), and the
candidate's log is at least as up to date as its own (the vote rule).
Granting changes no term or vote; it only postpones the granter's own
election timer, so the candidate it backs stands alone. With grants from a majority
(itself included) the timer is released and pysyncobj runs its election,
with a new term. Otherwise the round lapses and another starts at the next
timeout. A member that refuses a candidate only because that candidate's log
is behind its own, with no leader alive, runs its own round at once (the
up-to-date member should stand: see `_mq_after_vote_request`).

A leader that dies closes its connections (kill -9, a crash, a restart: the
kernel closes them at once; a partition does not). A follower whose
connection to its leader closes stops counting that leader as heard and
stands within `EARLY_STAND_MAX_S` (random, so the two followers of a 3-node
cluster rarely stand together) instead of after a whole election timeout:
`PreVoteGate.on_leader_link_lost`. Pre-vote keeps this safe: while the
leader lives, the members still connected to it refuse.

A member whose term is ahead of a live leader's (its pre-vote passed but its election
did not reach the others, say on a lossy link) would be stuck: pysyncobj ignores
append_entries of an older term without a word (its replies carry no term), so the
leader never learns the newer term, and the members that hear the leader refuse every
pre-vote. Such a member answers the leader's next append_entries with a `request_vote`
of its own term and log (`PreVoteGate.on_older_leader`, at most once per minimum
election timeout per peer): the leader takes the term and steps down, the up-to-date
members stand, and the stuck one follows the winner. It costs one election, which is
what etcd does for the same case (a response carrying the higher term).

Not gated: a leadership transfer (the leader asked for it with timeout_now,
and the others still hear it, so they would refuse). A joining node never
times out. Mixed releases: a node of an earlier release ignores
`mq_prevote` (an unknown message type) and never asks for one, so in a
cluster where such nodes are the majority only they can stand; a rolling
upgrade keeps a leader throughout.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from pysyncobj.monotonic import monotonic as _pysyncobj_now
from pysyncobj.syncobj import _RAFT_STATE

from mqnode.raft.internals import SyncInternals

log = logging.getLogger("mqnode.raft")

EARLY_STAND_MAX_S = 0.1  # after the leader's connection closed: stand within this
PREVOTE = "mq_prevote"
PREVOTE_GRANTED = "mq_prevote_granted"
# A refusal from a member that hears a live leader, naming it: a candidate whose member
# list lacks that leader learns that its peers setting is wrong (raft/member_lists.py).
# Earlier releases neither send nor read it.
PREVOTE_REFUSED = "mq_prevote_refused"
HEARD_OF_LEADER_FOR_S = 30.0
_LEADER = _RAFT_STATE.LEADER


def grants(
    *,
    is_leader: bool,
    leader_heard_s: float | None,
    alive_s: float,
    theirs: tuple[int, int],
    ours: tuple[int, int],
) -> bool:
    """Whether to grant a pre-vote; logs are (last log term, last log index)."""
    if is_leader:
        return False
    if leader_heard_s is not None and leader_heard_s < alive_s:
        return False
    return theirs >= ours


class PreVote:
    """Pre-vote rounds of one node: which round is open, who granted it, what it allows."""

    def __init__(self) -> None:
        self._round = 0
        self._term: int | None = None  # the term the open round was started in
        self._needed = 0  # grants from others still wanted
        self._granted: set[str] = set()
        self._passed_term: int | None = None
        self.failed_rounds = 0  # rounds in a row that lapsed without a majority

    def may_elect(self, term: int) -> bool:
        """Whether pysyncobj may start an election from `term` (a round passed in it)."""
        return self._passed_term == term

    def start(self, term: int, voters: int) -> int:
        """Open a round in `term` among `voters` (this node included); its id."""
        if self._term is not None and self._passed_term != self._term:
            self.failed_rounds += 1
        self._round += 1
        self._term = term
        self._granted = set()
        self._needed = voters // 2  # a majority of voters, less this node's own
        if self._needed <= 0:
            self._pass()
        return self._round

    def grant(self, round_id: Any, term: int, voter: str) -> bool:
        """Count a grant; True when it completes a majority for the open round."""
        if round_id != self._round or term != self._term or self._passed_term == term:
            return False
        self._granted.add(voter)
        if len(self._granted) < self._needed:
            return False
        self._pass()
        return True

    def _pass(self) -> None:
        self._passed_term = self._term
        self.failed_rounds = 0


class PreVoteGate:
    """One node's pre-vote: the gate before each tick and the two messages (tick thread only).

    `joining` says whether this node is still waiting for a leader to add it: such a
    node never stands, and never stands early.
    """

    def __init__(
        self,
        sync: Any,
        raw: SyncInternals,
        alive_s: float,
        joining: Callable[[], bool],
        rng: random.Random | None = None,
    ) -> None:
        self._sync = sync
        self._raw = raw
        self._alive_s = alive_s  # a leader heard within this is alive (min election timeout)
        self._joining = joining
        self._rng = rng or random.Random()
        self._prevote = PreVote()
        self._told_leader: tuple[str, float] | None = None  # (address, when) from a refusal
        self._reminded: dict[Any, float] = {}  # peer -> when on_older_leader last wrote it

    def leader_named_by_others(self) -> str | None:
        """The leader a member named when it refused our pre-vote lately, if any."""
        told = self._told_leader
        if told is None or _pysyncobj_now() - told[1] > HEARD_OF_LEADER_FOR_S:
            return None
        return told[0]

    def on_leader_link_lost(self) -> None:
        """Tick thread (the transport): our connection to the leader closed; stand soon."""
        raw = self._raw
        raw.transport.mq_leader_heard_at = None
        if self._joining() or raw.transfer_in_progress:
            return
        soon = _pysyncobj_now() + self._rng.uniform(0.0, EARLY_STAND_MAX_S)
        if raw.election_deadline > soon:
            raw.election_deadline = soon
            log.info(
                "raft: the connection to the leader closed; standing within %.0f ms "
                "unless the others still hear it",
                EARLY_STAND_MAX_S * 1000,
            )

    def on_older_leader(self, node: Any, message_term: int) -> None:
        """Tick thread (the transport): append_entries from `node` in a term older than ours."""
        sync, raw = self._sync, self._raw
        term = sync.raftCurrentTerm
        if not 0 <= message_term < term or raw.state == _LEADER or node not in raw.other_nodes:
            return
        if self._joining():
            return
        now = _pysyncobj_now()
        if now - self._reminded.get(node, -self._alive_s) < self._alive_s:
            return
        if len(self._reminded) >= 64:  # members come and go: stay bounded
            self._reminded.clear()
        self._reminded[node] = now
        log.warning(
            "raft: %s still leads term %d, older than ours (%d), and cannot learn ours from "
            "pysyncobj's replies; asking it for a vote in term %d so it steps down",
            getattr(node, "address", node),
            message_term,
            term,
            term,
        )
        raw.transport.send(
            node,
            {
                "type": "request_vote",
                "term": term,
                "last_log_index": raw.last_log_index(),
                "last_log_term": raw.last_log_term(),
            },
        )

    def until_election_s(self, now: float) -> float:
        """Seconds until this node's election timer runs out (inf while leading).

        The tick's poll sleeps at most this long, so each member stands at its own
        random moment: with a fixed poll period both followers woke at the same tick
        after a leader's death, passed their pre-votes together and split the vote.
        """
        raw = self._raw
        if raw.state == _LEADER:
            return float("inf")
        return max(0.0, raw.election_deadline - now)

    def gate_election(self) -> None:
        """Tick thread, before each tick: hold pysyncobj's election until a pre-vote passes."""
        sync, raw = self._sync, self._raw
        if raw.state == _LEADER or sync.selfNode is None:
            return
        if raw.transfer_in_progress:
            return
        now = _pysyncobj_now()
        term = sync.raftCurrentTerm
        if raw.election_deadline >= now or self._prevote.may_elect(term):
            return
        raw.election_deadline = now + raw.random_election_timeout()
        others = list(raw.other_nodes)
        failed_before = self._prevote.failed_rounds
        round_id = self._prevote.start(term, len(others) + 1)
        if self._prevote.failed_rounds == 1 and failed_before == 0:
            log.info(
                "raft: no majority would vote for this node (pre-vote, term %d); it stays "
                "a follower and asks again at each election timeout",
                term,
            )
        if self._prevote.may_elect(term):
            raw.election_deadline = 0.0
            return
        message = {
            "type": PREVOTE,
            "round": round_id,
            "last_log_term": raw.last_log_term(),
            "last_log_index": raw.last_log_index(),
        }
        transport = raw.transport
        for node in others:
            transport.send(node, message)

    def on_message(self, node: Any, message: dict[str, Any]) -> None:
        """Tick thread (the transport's receive path): a pre-vote request, grant or refusal."""
        sync, raw = self._sync, self._raw
        if message.get("type") == PREVOTE_REFUSED:
            leader = message.get("leader")
            if node in raw.other_nodes and isinstance(leader, str) and len(leader) <= 261:
                self._told_leader = (leader, _pysyncobj_now())
            return
        if message.get("type") == PREVOTE_GRANTED:
            if node not in raw.other_nodes:
                return
            failed = self._prevote.failed_rounds
            term = sync.raftCurrentTerm
            if self._prevote.grant(message.get("round"), term, str(node.address)):
                if failed:
                    log.info("raft: pre-vote passed after %d that did not; standing", failed)
                if raw.state != _LEADER:
                    raw.election_deadline = 0.0  # stand at the next tick
            return
        last_term, last_index = message.get("last_log_term"), message.get("last_log_index")
        if not isinstance(last_term, int) or not isinstance(last_index, int):
            return
        if sync.selfNode is None:
            return
        ours = (raw.last_log_term(), raw.last_log_index())
        transport = raw.transport
        heard_at = transport.mq_leader_heard_at
        heard_s = None if heard_at is None else _pysyncobj_now() - heard_at
        is_leader = raw.state == _LEADER
        if grants(
            is_leader=is_leader,
            leader_heard_s=heard_s,
            alive_s=self._alive_s,
            theirs=(last_term, last_index),
            ours=ours,
        ):
            transport.send(node, {"type": PREVOTE_GRANTED, "round": message.get("round")})
            # Let the candidate we back stand alone: had our own (early) timer run out
            # meanwhile, both would pass and split the vote (seen after a leader's
            # kill, where both followers stand within EARLY_STAND_MAX_S).
            # Never sooner than it was (a joining node's timer is infinite).
            later = _pysyncobj_now() + raw.random_election_timeout()
            raw.election_deadline = max(raw.election_deadline, later)
        elif not (is_leader or self._joining()) and (heard_s is None or heard_s >= self._alive_s):
            # Refused only for its log: no leader here either, and ours is further on.
            raw.election_deadline = 0.0
        else:
            leader = getattr(sync.selfNode if is_leader else raw.leader, "address", None)
            if isinstance(leader, str):
                refusal = {"type": PREVOTE_REFUSED, "round": message.get("round"), "leader": leader}
                transport.send(node, refusal)
