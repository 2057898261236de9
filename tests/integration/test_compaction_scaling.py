"""The snapshot threshold grows with the queue state (raft/compaction.py) on real nodes.

A cluster configured to snapshot every 50 entries is loaded past 64 MiB of
queue state with 100 KiB messages; /status then reports a larger
`snapshot_after_entries` on every node, and every message is still queued
once on each (the log and snapshots it crossed on the way agree).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mqnode.raft.compaction import SCALE_FROM_BYTES
from tests.support.checks import assert_acked_once
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.smtp import make_message, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONFIGURED = 50
SIZE = 100 * 1024
COUNT = SCALE_FROM_BYTES // SIZE * 5 // 4  # a quarter more than the state needs to scale


def test_snapshot_threshold_follows_the_state_size(tmp_path: Path) -> None:
    args = (*FAST_TUNING, "--log-compaction-min-entries", str(CONFIGURED))
    with Cluster(tmp_path, extra_args=args) as c:
        assert {c.status(i)["snapshot_after_entries"] for i in range(3)} == {CONFIGURED}
        port = c.nodes[c.leader()].smtp_port

        def one(k: int) -> tuple[str, str | None]:
            msg = make_message(SIZE)
            code, text, qid = submit("127.0.0.1", port, "a@client.test", ["r@x.test"], msg.data)
            assert code == 250, (k, code, text)
            return msg.message_id, qid

        with ThreadPoolExecutor(8) as pool:
            acked = {mid: qid for mid, qid in pool.map(one, range(COUNT)) if qid}
        assert len(acked) == COUNT

        def scaled() -> tuple[list[int] | None, str]:
            got = [c.status(i)["snapshot_after_entries"] for i in range(3)]
            return (got if min(got) > CONFIGURED else None), str(got)

        c.poll("every node to snapshot less often once its state is large", scaled, 20.0)
        c.wait_applied_equal()
        assert_acked_once(c, acked)
