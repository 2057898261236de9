"""paired-suppression: what a big suppression list costs acceptance.

In each round, back to back (bench/paired.py's rounds: fresh clusters, a
warm-up, order rotated): a 3-node cluster with 2 SMTP workers and an empty
suppression list, and the same with `ENTRIES` entries (addresses of one
domain, written through the admin endpoint in requests of `BATCH`, i.e.
through the log as any operator's import would be). smtp-source, 1 KiB,
`plan.sessions` sessions; its recipient is not suppressed, so every RCPT
TO asks the node (the workers' question is skipped only for an empty list)
and looks the entries up. Postfix's row is there for scale.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from bench import postfix
from bench.paired import POSTFIX, WARMUP_CHUNKS, rounds
from bench.plan import KIB, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import Row
from tests.support.cluster import ADMIN_TOKEN, Cluster

EMPTY = "mqnode 3 nodes, 2 smtp workers, no suppression entries"
FULL_LIST = "mqnode 3 nodes, 2 smtp workers, 1M suppression entries"
SYSTEMS = (EMPTY, FULL_LIST, POSTFIX)
ENTRIES = 1_000_000
BATCH = 5000  # entries per request (the admin endpoint takes bodies up to 1 MiB)
LABELS = {EMPTY: "x empty list"}


def paired_suppression(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    entries = ENTRIES if plan.mode == "full" else ENTRIES // 10

    def measure(name: str, messages: int, row: Row, base: Path) -> float:
        warmup = WARMUP_CHUNKS * messages
        if name == POSTFIX:
            accept, _ = postfix.measure_postfix(
                messages, plan.sessions, KIB, max_s=plan.max_s, warmup=warmup
            )
            return accept.rate
        with bench_cluster(
            base / name.split(",")[-1].strip().replace(" ", "-"), 3, extra=WORKERS
        ) as c:
            if name == FULL_LIST:
                row.extra["entries"] = entries
                row.extra["load_s"] = round(fill(c, entries), 1)
            port = c.nodes[c.leader()].smtp_port
            postfix.run_source(port, warmup, plan.sessions, KIB, max_s=plan.max_s)
            _, rate = postfix.run_source(port, messages, plan.sessions, KIB, max_s=plan.max_s)
            return rate

    rounds("paired-suppression", SYSTEMS, measure, plan, tmp, step, out, (EMPTY, POSTFIX), LABELS)


def fill(c: Cluster, entries: int) -> float:
    """Write `entries` addresses (none of them smtp-source's recipient); seconds it took."""
    t0 = time.monotonic()
    node = c.nodes[c.leader()]
    for start in range(0, entries, BATCH):
        batch = [
            {"target": f"user{i}@suppressed.bench.test", "reason": "bench", "source": "import"}
            for i in range(start, min(entries, start + BATCH))
        ]
        req = urllib.request.Request(
            node.admin_url + "/suppressions/add",
            data=json.dumps({"entries": batch}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            done = json.loads(r.read())
        if done["entries"] != len(batch):
            raise postfix.PostfixBenchError(f"suppression fill: {done}")
    return time.monotonic() - t0
