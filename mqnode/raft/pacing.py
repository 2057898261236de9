"""AppendPacer: when the leader sends new entries to its followers.

pysyncobj's tick sent every tick's new entries at once. Under load that is
one AppendEntries per follower per tick, each costing the follower a receive,
a journal fsync, a state commit and an ack, and the leader an encryption and
an ack to process: with 20 SMTP sessions a follower handled ~5 messages per
round. Holding new entries back while the previous send is less than
`interval_s` old lets each round carry more (bench.profile, 3 nodes on 2
cores, 6 ms: follower CPU per message 158 -> 97 us, leader 246 -> 190 us,
commit latency unchanged because the CPUs are less contended). The default
became 4 ms with StateCommitPacer, which made a round cheaper.

The first send after a quiet spell goes at once, so an idle cluster commits
a lone message as fast as before; a log-mismatch resend never waits, nor does
an entry a follower's own client waits for (`follower_waits`). Pure: the
caller passes the time (pysyncobj's monotonic clock).
"""

from __future__ import annotations


class AppendPacer:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")
        self._due: float | None = None  # entries held back must go at this time

    def should_send(self, now: float, news: bool, urgent: bool = False) -> bool:
        """Send now? `news`: new entries or a new commit index; `urgent`: a resend."""
        if not (news or urgent or self._due is not None):
            return False
        if urgent or now - self._last >= self.interval_s:
            self._last, self._due = now, None
            return True
        self._due = self._last + self.interval_s
        return False

    def wait_s(self, now: float, longest: float) -> float:
        """How long the tick may sleep: until held-back entries are due, at most `longest`."""
        if self._due is None:
            return longest
        return max(0.0, min(longest, self._due - now))

    def due_before(self, deadline: float) -> bool:
        """Whether held-back entries are due before `deadline`."""
        return self._due is not None and self._due < deadline

    def reset(self) -> None:
        """Not the leader (any more): nothing is held back."""
        self._due = None


def follower_waits(waiting: int, sent_upto: int, sent_commit: int, commit: int) -> bool:
    """Whether the leader should send now for a follower's own submission.

    `waiting` is the highest log index the leader gave a follower's forwarded
    command. That follower answers its SMTP client once it has the entry and
    learns it is committed; each paced wait cost it up to an interval, twice
    (mail submitted to followers: 0.7x the leader's rate, and 2 of 3 clients
    reach a follower behind a round-robin name). Sent at once when the entry
    has not gone out yet, and when the commit that covers it has not.
    """
    return waiting > sent_upto or sent_commit < waiting <= commit


class StateCommitPacer:
    """When a follower commits its LMDB state: at most every `interval_s` while busy.

    A follower has no reader waiting on its state: its own SMTP clients are
    answered once the entry is in its journal and known committed (early
    answers), and it neither dispatches nor claims. Committing the state every
    round cost each follower a second fsync'd LMDB commit per round beside the
    journal's. Held back, applied entries wait in the open state transaction;
    the journal (already durable) replays them after a crash, as it does for
    the window between the two commits anyway, and a snapshot or an install
    commits first. A leader, a waiting caller, a state map half full (an
    open transaction needs room for every page it copies) or an old enough
    transaction commits at once. Pure: the caller passes the time.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = float("-inf")

    def should_commit(self, now: float, at_once: bool, callers_waiting: bool) -> bool:
        """`at_once`: a leader, or a follower whose state map is filling up."""
        if at_once or callers_waiting or now >= self._next:
            self._next = now + self.interval_s
            return True
        return False
