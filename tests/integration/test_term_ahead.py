"""A member whose term got ahead of a live leader's rejoins it.

A pre-vote that passes but whose election never reaches the others (a lossy link) leaves
that member at a newer term while the leader goes on in its own. pysyncobj ignores
append_entries of an older term without a word and its replies carry no term, so the
leader never learns of the newer one, and the members that hear the leader refuse every
pre-vote: the member refused mail with `missing_leader` for good (seen under real packet
loss in tests/fault/test_net_faults.py::test_slow_lossy_links). Here the term is put
ahead on disk while the member is stopped, which gives the same state every time.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mqnode.raft.journal import DurableJournal
from mqnode.raft.logstore import LogStore
from tests.support.cluster import FAST_TUNING, HOST, Cluster
from tests.support.smtp import make_message, submit

pytestmark = pytest.mark.integration


def test_a_member_whose_term_is_ahead_of_the_leader_rejoins(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=FAST_TUNING) as c:
        lead = c.leader()
        term = int(c.status(lead)["term"])
        stuck = c.followers()[0]
        c.stop_node(stuck)
        store = LogStore(c.nodes[stuck].data_dir / "raft", 64)
        DurableJournal(store).setCurrentTerm(term + 5, None)
        store.close()
        c.start_node(stuck)

        deadline = time.monotonic() + 30
        code, text = -1, "nothing yet"
        while time.monotonic() < deadline:
            msg = make_message(512)
            code, text, _ = submit(
                HOST, c.nodes[stuck].smtp_port, "a@client.test", ["r@example.test"], msg.data
            )
            if code == 250:
                break
            time.sleep(0.3)
        assert code == 250, f"the member whose term was ahead still refuses: {code} {text}"
        leader = c.wait_for_leader()
        assert int(c.status(leader)["term"]) > term + 5
        c.wait_applied_equal()
