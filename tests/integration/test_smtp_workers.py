"""SMTP worker processes (`smtp_workers`) on real nodes: counts, events, deaths, stops.

The SMTP behaviour through workers (TLS, AUTH, limits per node) is covered by
test_smtp_submission.py, which runs once in-process and once with two
workers. Here: the processes. A worker killed with kill -9 is started again
and the node keeps accepting; a node killed with kill -9 takes its workers
with it (they see the link close) and starts again on the same port; a node
stopped with SIGTERM stops its workers. Worker PIDs are read from /proc (the
node's children), and every wait is a bounded poll.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.support.checks import assert_acked_once, offer_ok
from tests.support.cli import RunCli
from tests.support.cluster import FAST_TUNING, Cluster, http_get
from tests.support.procs import alive, children

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WORKERS = ("--smtp-workers", "2")


def node_pid(c: Cluster, i: int) -> int:
    proc = c.nodes[i].proc
    assert proc is not None
    return proc.pid


def wait_workers(c: Cluster, i: int, n: int, not_in: tuple[int, ...] = ()) -> list[int]:
    """Node i's n worker PIDs once there are n, none of them in `not_in`."""

    def probe() -> tuple[list[int] | None, str]:
        pids = children(node_pid(c, i))
        ok = len(pids) == n and not set(pids) & set(not_in)
        return (pids if ok else None), str(pids)

    return c.poll(f"{n} smtp workers of {c.nodes[i].node_id}", probe, 20.0)


def accepted_metric(c: Cluster, i: int) -> int:
    text = http_get(c.nodes[i].admin_url + "/metrics").decode()
    m = re.search(r'^mqnode_smtp_messages_total\{result="accepted"\} (\S+)$', text, re.M)
    assert m is not None, text[:2000]
    return int(float(m.group(1)))


def test_workers_accept_count_and_log_events(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=(*FAST_TUNING, *WORKERS, "--event-log", "-")) as c:
        lead = c.leader()
        follower = c.followers()[0]
        assert len(wait_workers(c, lead, 2)) == 2
        acked: dict[str, str] = {}
        for k in range(12):
            offer_ok(c, lead if k % 2 else follower, acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)

        def counted() -> tuple[bool | None, str]:
            n = accepted_metric(c, lead) + accepted_metric(c, follower)
            return (True if n == 12 else None), f"{n} accepted"

        c.poll("accepted counts pushed by the workers", counted, 10.0)
        # the node writes the events of its workers' messages (received, then committed)
        lines = c.nodes[follower].log_path.read_text(errors="replace").splitlines()
        for qid in list(acked.values())[0::2]:  # those sent to the follower
            events = [
                e
                for e in ("received", "committed")
                for ln in lines
                if qid in ln and f'"event":"{e}"' in ln
            ]
            assert events == ["received", "committed"], (qid, events)


def test_killed_worker_is_replaced_and_mail_goes_on(tmp_path: Path, run_cli: RunCli) -> None:
    with Cluster(tmp_path, extra_args=(*FAST_TUNING, *WORKERS)) as c:
        lead = c.leader()
        before = wait_workers(c, lead, 2)
        os.kill(before[0], signal.SIGKILL)
        after = wait_workers(c, lead, 2, not_in=(before[0],))
        assert before[0] not in after and before[1] in after

        def reported() -> tuple[dict[str, object] | None, str]:
            st = c.get(lead, "/status")["smtp_workers"]
            ok = sorted(st["pids"]) == after and st["up"] == 2
            return (st if ok else None), str(st)

        st = c.poll("/status to show the new worker accepting", reported, 10.0)
        assert st["configured"] == 2 and st["restarts"] == 1, st
        table = run_cli("status", "--admin", c.nodes[lead].admin_addr).stdout
        assert "2 of 2 worker processes running" in table and "1 restarts" in table, table
        assert "2 accepting" in table, table
        acked: dict[str, str] = {}
        for _ in range(6):
            offer_ok(c, lead, acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)
        assert "smtp worker 0 exited (signal 9)" in c.nodes[lead].log_path.read_text()


def test_node_killed_takes_its_workers_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    with Cluster(tmp_path, extra_args=(*FAST_TUNING, *WORKERS)) as c:
        victim = c.followers()[0]
        workers = wait_workers(c, victim, 2)
        c.kill(victim)

        def gone() -> tuple[bool | None, str]:
            left = [p for p in workers if alive(p)]
            return (True if not left else None), f"still running: {left}"

        c.poll("the killed node's workers to exit", gone, 10.0)
        c.start_node(victim)
        wait_workers(c, victim, 2)
        acked: dict[str, str] = {}
        offer_ok(c, victim, acked)
        c.wait_applied_equal()
        assert_acked_once(c, acked)

        stopped = wait_workers(c, victim, 2)
        assert c.stop_node(victim) == 0
        assert not [p for p in stopped if alive(p)], "SIGTERM left workers running"
