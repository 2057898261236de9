"""/metrics (Prometheus text), /healthz and /readyz on real nodes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.smtp import make_message, submit

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_health_and_readiness(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=FAST_TUNING) as c:
        lead = c.leader()
        for k in range(3):
            msg = make_message(700, rcpt=f"u{k}@metrics.test")
            code, _, _ = submit(
                "127.0.0.1",
                c.nodes[lead].smtp_port,
                "a@client.test",
                [f"u{k}@metrics.test"],
                msg.data,
            )
            assert code == 250
        c.wait_applied_equal(20)
        status, text = _get(c.nodes[lead].admin_url + "/metrics")
        assert status == 200
        assert _metric(text, 'mqnode_queue_messages{state="active"}') == 3
        assert _metric(text, 'mqnode_queue_domain_messages{domain="metrics.test"}') == 3
        assert _metric(text, 'mqnode_smtp_messages_total{result="accepted"}') == 3
        assert _metric(text, 'mqnode_raft_role{role="leader"}') == 1
        assert _metric(text, "mqnode_raft_term") >= 1
        assert _metric(text, "mqnode_commit_seconds_count") >= 3
        assert "mqnode_raft_replication_lag_entries{peer=" in text
        assert 0 <= _metric(text, "mqnode_store_fill_ratio") < 0.9
        assert _metric(text, "mqnode_delivery_destinations_suspended") == 0
        for n in c.nodes:
            assert _get(n.admin_url + "/healthz")[0] == 200
            assert _get(n.admin_url + "/readyz")[0] == 200

        survivor = c.followers()[0]
        for i in range(3):
            if i != survivor:
                c.kill(i)
        deadline = time.monotonic() + 20
        code = 200
        while time.monotonic() < deadline:
            code = _get(c.nodes[survivor].admin_url + "/readyz")[0]
            if code == 503:
                break
            time.sleep(0.2)
        assert code == 503, "a node without quorum still says it is ready"
        assert _get(c.nodes[survivor].admin_url + "/healthz")[0] == 200
