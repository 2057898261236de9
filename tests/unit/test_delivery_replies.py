"""How a remote reply maps to a recipient's outcome (delivery/client.py)."""

from __future__ import annotations

import pytest

from mqnode.delivery.client import _outcome_for, _refused
from mqnode.spool.model import Outcome


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(250, Outcome.DELIVERED), (251, Outcome.DELIVERED), (451, Outcome.DEFERRED),
     (421, Outcome.DEFERRED), (550, Outcome.BOUNCED), (554, Outcome.BOUNCED),
     (354, Outcome.DEFERRED), (-1, Outcome.DEFERRED)],
)  # fmt: skip
def test_final_reply(code: int, outcome: Outcome) -> None:
    assert _outcome_for(code) is outcome


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(550, Outcome.BOUNCED), (553, Outcome.BOUNCED), (451, Outcome.DEFERRED),
     (250, Outcome.DEFERRED), (220, Outcome.DEFERRED), (354, Outcome.DEFERRED)],
)  # fmt: skip
def test_a_command_refused_never_counts_as_delivered(code: int, outcome: Outcome) -> None:
    """MAIL, RCPT or DATA answered with anything but their success code: a 2xx there
    (a confused server) must not mark the recipient delivered."""
    assert _refused(code) is outcome
