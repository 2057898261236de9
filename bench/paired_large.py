"""paired-large: 100 KiB, 1 MiB and 5 MiB messages through mqnode and Postfix, back to back.

The size the industry benchmarks with is 100 KB (marketing mail, KumoMTA's
published figures); attachments make 1-5 MiB. In each round, for each size,
a fresh 3-node cluster with 2 SMTP workers per node relaying to a loopback
smtp-sink, and a fresh Postfix relaying to its own: smtp-source (20
sessions, one recipient) into each, order rotated per round. One run gives
both figures:

  accepted   messages over smtp-source's run (every one answered 250 after
             the majority commit / Postfix's fsync)
  delivered  messages over the time until the sink had them all

Rows are medians over rounds, with the ratio to Postfix's taken within each
round (median and range) and MiB/s. No warm-up: its backlog would still be
relaying during the measured run; both systems start cold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import postfix
from bench.paired import summary
from bench.plan import KIB, MIB, SMTP_SOURCE, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import HOST, Row
from tests.support.cluster import free_ports

WORKLOAD = "paired-large"
SIZES = (100 * KIB, MIB, 5 * MIB)
MQNODE = "mqnode 3 nodes, 2 smtp workers"
POSTFIX = "Postfix"
SYSTEMS = (MQNODE, POSTFIX)
ROUNDS = {"full": 3, "quick": 1}
QUICK_BYTES = 20 * MIB  # per row in quick mode (full: the plan's bytes per row)


def paired_large(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    why = postfix.available()
    if why is not None:
        step(f"{WORKLOAD}: skipped ({why})")
        out.rows.append(Row(WORKLOAD, POSTFIX, note=f"skipped: {why}"))
        return
    rounds = ROUNDS.get(plan.mode, 1)
    for size in SIZES:
        per_row = plan.bytes_per_row if plan.mode == "full" else QUICK_BYTES
        messages = max(20, min(plan.messages, per_row // size))
        params: dict[str, Any] = {"size": size, "sessions": plan.sessions, "messages": messages}
        params["generator"] = SMTP_SOURCE
        rates: dict[str, list[float | None]] = {}
        for r in range(rounds):
            turn = r % len(SYSTEMS)
            for name in SYSTEMS[turn:] + SYSTEMS[:turn]:
                step(f"{WORKLOAD}: {size // KIB} KiB, round {r + 1}/{rounds}, {name}")
                base = tmp / f"{size}-{r}"
                try:
                    accepted, delivered = _run(name, messages, size, plan, base)
                except postfix.PostfixBenchError as exc:
                    out.rows.append(Row(WORKLOAD, name, {**params, "round": r + 1}, note=str(exc)))
                    accepted = delivered = None
                for what, rate in (("accepted", accepted), ("delivered", delivered)):
                    rates.setdefault(f"{name}, {what}", []).append(rate)
        for what in ("accepted", "delivered"):
            ref = f"{POSTFIX}, {what}"
            mine = {f"{n}, {what}": rates[f"{n}, {what}"] for n in SYSTEMS}
            rows = summary(mine, params, WORKLOAD, (ref,), {ref: "x Postfix"})
            for row in rows:
                if row.rate:
                    row.note += f"; {row.rate * size / MIB:,.1f} MiB/s"
            out.rows += rows


def _run(name: str, messages: int, size: int, plan: Plan, base: Path) -> tuple[float, float]:
    """(accepted msg/s, delivered msg/s) of one cold run."""
    max_s = plan.max_s * 4
    if name == POSTFIX:
        accept, e2e = postfix.measure_postfix(messages, plan.sessions, size, max_s=max_s)
        if not (accept.rate > 0 and e2e.rate > 0):  # NaN when it failed
            raise postfix.PostfixBenchError(f"Postfix: {accept.note or e2e.note}")
        return accept.rate, e2e.rate
    port = free_ports(1)[0]
    with (
        postfix.smtp_sink(port) as sink,
        bench_cluster(base, 3, relay=f"{HOST}:{port}", extra=WORKERS) as c,
    ):
        before = sink.received()
        t0 = time.monotonic()
        elapsed, _ = postfix.run_source(
            c.nodes[c.leader()].smtp_port, messages, plan.sessions, size, max_s=max_s
        )
        if not sink.wait_for(before + messages, max_s):
            raise postfix.PostfixBenchError(f"smtp-sink got {sink.received() - before}")
        return messages / elapsed, messages / (time.monotonic() - t0)
