"""ConcurrencyWindow: how many sessions one destination gets, from how its sessions end.

After Postfix's concurrency feedback (SCHEDULER_README): a destination starts
at `initial_destination_concurrency` (5) sessions; each session that got a
transaction answered raises the window by 1/window, up to
`per_destination_concurrency`; each that reached no host or lost its
connection lowers it by 1/window, to no less than 1. A host that greets with
a refusal (421, a receiver's limit on connections from one client) holds as
many of our sessions as it takes: the window drops to the destination's other
sessions open at that moment, then grows again by 1/window per answer. A
fixed number of sessions hammered such a receiver: every surplus session
ended in a 421 and one more deferral (tests/integration/test_delivery.py: 40
messages to a receiver taking 2 connections met 160-168 refusals with 10
fixed sessions, 38-39 with 1/window for a 421 too, 12 with this).

Sessions that reached no host, or lost their connection, count in cohorts of
`window` sessions: once a whole cohort failed with no success between
(`failed_cohort_limit` 1), the destination is dead and the dispatcher
suspends it. A destination none of whose hosts answers ends its first cohort
together (its sessions all wait out the same connect timeout) and is
suspended then. A 421 greeting never counts towards death: the host is
alive, and a refusal costs no wait. Counted, the receiver above was suspended
within its first second: the sessions it refused came back at once while the
two it served were still delivering.

Pure and deterministic: the dispatcher reports each session's end.
"""

from __future__ import annotations

from enum import Enum

FAILED_COHORT_LIMIT = 1.0  # Postfix's default_destination_concurrency_failed_cohort_limit


class Contact(Enum):
    """How a delivery attempt's session ended, for concurrency feedback."""

    ANSWERED = "answered"  # a host answered the transaction (whatever it replied)
    BUSY = "busy"  # every host that took the connection greeted with a refusal (421)
    LOST = "lost"  # the connection broke during the transaction
    UNREACHABLE = "unreachable"  # no host took the connection, or none greeted
    NO_FEEDBACK = "none"  # nothing learnt: TLS required but not offered, no host tried

    @property
    def failed(self) -> bool:
        return self in (Contact.BUSY, Contact.LOST, Contact.UNREACHABLE)


class ConcurrencyWindow:
    def __init__(self, initial: int, limit: int) -> None:
        self.limit = limit
        self.initial = float(max(1, min(initial, limit)))
        self.window = self.initial
        self.failed_cohorts = 0.0  # since the last success, in cohorts of `window` sessions

    @property
    def sessions(self) -> int:
        """Sessions the destination may have open at once."""
        return int(self.window)

    @property
    def failing(self) -> bool:
        return self.failed_cohorts > 0

    @property
    def learnt(self) -> bool:
        """Whether feedback moved it: a new window for the destination would differ."""
        return self.window != self.initial or self.failing

    def feedback(self, contact: Contact, others_open: int = 0) -> bool:
        """Take a session's end into account; True when the destination is now dead.

        `others_open`: the destination's other sessions open as this one ended. A 421
        says the receiver holds as many of ours as it takes: the window drops to those."""
        if contact is Contact.BUSY:
            self.window = max(1.0, min(self.window - 1.0 / self.window, float(others_open)))
            return False
        if contact is Contact.ANSWERED:
            self.failed_cohorts = 0.0
            self.window = min(float(self.limit), self.window + 1.0 / self.window)
            return False
        if not contact.failed:
            return False
        self.failed_cohorts += 1.0 / self.window
        self.window = max(1.0, self.window - 1.0 / self.window)
        return self.failed_cohorts >= FAILED_COHORT_LIMIT
