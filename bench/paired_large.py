"""paired-large: 100 KiB, 1 MiB and 5 MiB messages through mqnode and Postfix, back to back.

The size the industry benchmarks with is 100 KB (marketing mail, KumoMTA's
published figures); attachments make 1-5 MiB. In each round, for each case,
a fresh 3-node cluster with 2 SMTP workers per node relaying to a loopback
smtp-sink, and a fresh Postfix relaying to its own, order rotated per round;
20 sessions, one recipient. Cases: smtp-source's text at each size; then
distinct messages sent by bench/loadgen.py into both: 100 KiB and 1 MiB with
a base64 attachment, and 100 KiB of HTML. smtp-source's text deflates to 1%
(and its -F repeats one message, which mqnode keeps once as retries of one
submission); mqnode's journal stores big entries deflated, so the text rows
are its best case, the attachment rows (random bytes do not compress) its
worst, and the HTML rows (deflates to ~0.39 at level 1; HTML and text files
to 0.18-0.43) what text and HTML mail gets. One run gives both figures:

  accepted   messages over the generator's run (every one answered 250 after
             the majority commit / Postfix's fsync)
  delivered  messages over the time until the sink had them all

Rows are medians over rounds, with the ratio to Postfix's taken within each
round (median and range) and MiB/s. No warm-up: its backlog would still be
relaying during the measured run; both systems start cold, measured once
started: Postfix once it answers its banner, the cluster once every node's
SMTP workers accept (bench_cluster).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import postfix
from bench.loadgen import ATTACHMENT, NEWSLETTER
from bench.paired import summary
from bench.plan import KIB, MIB, OURS, SMTP_SOURCE, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import HOST, Row, run_load
from tests.support.cluster import free_ports

WORKLOAD = "paired-large"
SIZES = (100 * KIB, MIB, 5 * MIB)
# Distinct messages through bench/loadgen.py: with a base64 attachment (does not
# compress), and HTML (deflates to about a third, as text and HTML mail do).
OURS_CASES = ((ATTACHMENT, 100 * KIB), (ATTACHMENT, MIB), (NEWSLETTER, 100 * KIB))
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
        _summaries(rates, "", params, size, out)
    for content, size in OURS_CASES:
        per_row = plan.bytes_per_row if plan.mode == "full" else QUICK_BYTES
        messages = max(20, min(plan.messages, per_row // size))
        params = {"size": size, "sessions": plan.sessions, "messages": messages}
        params["generator"] = OURS
        kind = KINDS[content]
        rates = {}
        for r in range(rounds):
            turn = r % len(SYSTEMS)
            for name in SYSTEMS[turn:] + SYSTEMS[:turn]:
                step(f"{WORKLOAD}: {size // KIB} KiB {content}, round {r + 1}/{rounds}, {name}")
                try:
                    accepted, delivered = _run_ours(
                        name, messages, size, plan, tmp / f"{content}{size}-{r}", content
                    )
                except postfix.PostfixBenchError as exc:
                    row = Row(WORKLOAD, f"{name}{kind}", {**params, "round": r + 1})
                    row.note = str(exc)
                    out.rows.append(row)
                    accepted = delivered = None
                for what, rate in (("accepted", accepted), ("delivered", delivered)):
                    rates.setdefault(f"{name}{kind}, {what}", []).append(rate)
        _summaries(rates, kind, params, size, out)


KINDS = {ATTACHMENT: ", base64 attachment", NEWSLETTER: ", HTML newsletter"}


def _summaries(
    rates: dict[str, list[float | None]], kind: str, params: dict[str, Any], size: int, out: Results
) -> None:
    for what in ("accepted", "delivered"):
        ref = f"{POSTFIX}{kind}, {what}"
        mine = {f"{n}{kind}, {what}": rates[f"{n}{kind}, {what}"] for n in SYSTEMS}
        rows = summary(mine, params, WORKLOAD, (ref,), {ref: "x Postfix"})
        for row in rows:
            if row.rate:
                row.note += f"; {row.rate * size / MIB:,.1f} MiB/s"
        out.rows += rows


def _run_ours(
    name: str, messages: int, size: int, plan: Plan, base: Path, content: str
) -> tuple[float, float]:
    """(accepted, delivered) msg/s of one cold run of distinct messages of `content`."""
    max_s = plan.max_s * 4
    smtp_port, relay_port = free_ports(2)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(postfix.smtp_sink(relay_port))
        if name == POSTFIX:  # in the system's temp dir: the postfix user must reach it
            where = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-postfix-"))
            stack.enter_context(postfix.throwaway_postfix(Path(where), smtp_port, relay_port))
            port = smtp_port
        else:
            c = stack.enter_context(
                bench_cluster(base, 3, relay=f"{HOST}:{relay_port}", extra=WORKERS)
            )
            port = c.nodes[c.leader()].smtp_port
        before = sink.received()
        t0 = time.monotonic()
        result, elapsed = run_load(
            [(HOST, port)], messages, plan.sessions, size, max_s=max_s, content=content
        )
        acked = result.count(250)
        if acked < messages:
            raise postfix.PostfixBenchError(f"{acked} of {messages} answered 250")
        if not sink.wait_for(before + messages, max_s):
            raise postfix.PostfixBenchError(f"smtp-sink got {sink.received() - before}")
        return messages / elapsed, messages / (time.monotonic() - t0)


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
