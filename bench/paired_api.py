"""paired-api: the HTTP injection API's acceptance against SMTP's, on the same cluster.

In each round (bench/paired.py's rounds: fresh 3-node clusters with 2 SMTP workers,
a warm-up, order rotated), 1 KiB messages into the leader: smtp-source with
`plan.sessions` sessions; the API with as many concurrent requests, one raw message
each (bench/apiload.py, its own process); and the API with batches of 100
recipients, each its own message. Requests answered 503 (back-pressure: a batch
submits 100 commands at once) are sent again with the same Idempotency-Key, as
a client would, and counted in the row's note. A row's rate is messages queued a second (each
answered after the majority commit). The API is served by the node's own process
(SMTP by its workers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import postfix
from bench.paired import WARMUP_CHUNKS, rounds
from bench.plan import KIB, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import Row
from tests.support.cluster import ADMIN_TOKEN, Cluster

SMTP = "mqnode SMTP (smtp-source)"
API = "mqnode API, one message a request"
BATCH = "mqnode API, batches of 100 recipients"
SYSTEMS = (SMTP, API, BATCH)
BATCH_SIZE = 100


def paired_api(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    def measure(name: str, messages: int, row: Row, base: Path) -> float:
        warmup = WARMUP_CHUNKS * messages
        with bench_cluster(
            base / name.split(",")[-1].strip().replace(" ", "-"), 3, extra=WORKERS
        ) as c:
            lead = c.leader()
            if name == SMTP:
                port = c.nodes[lead].smtp_port
                postfix.run_source(port, warmup, plan.sessions, KIB, max_s=plan.max_s)
                _, rate = postfix.run_source(port, messages, plan.sessions, KIB, max_s=plan.max_s)
                return rate
            batch = BATCH_SIZE if name == BATCH else 0
            row.params["generator"] = "bench.apiload"
            load(c, lead, warmup, plan, batch)
            rate, retried = load(c, lead, messages, plan, batch)
            row.note = f"{retried} requests retried (503/429)" if retried else ""
            return rate

    first = len(out.rows)
    rounds("paired-api", SYSTEMS, measure, plan, tmp, step, out, (SMTP,), {SMTP: "x SMTP"})
    for row in out.rows[first:]:  # the summaries too: rounds() gives them smtp-source
        if row.name != SMTP:
            row.params["generator"] = "bench.apiload"


def load(c: Cluster, i: int, messages: int, plan: Plan, batch: int) -> tuple[float, int]:
    """(messages a second, requests retried after a 503 or 429)."""
    cmd = [
        sys.executable, "-m", "bench.apiload", c.nodes[i].admin_url + "/v1/messages", ADMIN_TOKEN,
        "--messages", str(messages), "--concurrency", str(plan.sessions), "--size", str(KIB),
        "--batch", str(batch), "--max-s", str(plan.max_s),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=plan.max_s + 60)
    if proc.returncode != 0:
        raise postfix.PostfixBenchError(f"apiload: {proc.stderr.strip()[-300:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["refused"] or result["messages"] < messages * 0.99:
        raise postfix.PostfixBenchError(f"apiload: {result}")
    return float(result["messages"]) / float(result["seconds"]), int(result["retried"])
