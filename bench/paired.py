"""paired: mqnode, Postfix and the null handler measured back to back in rounds; ratios per round.

The accept workload measures its rows minutes apart, and this machine's speed
drifts meanwhile: Postfix's 1 KiB, 20-session row ranged from 701 to 1,624
msg/s across a day of runs on one machine, and the null handler's
ratio to it from 1.5 to 2.1. Here each round measures the five systems one
after the other within seconds (each from a fresh start, after the same
unmeasured warm-up of twice the measured count, in an order rotated every
round), all with smtp-source, 1 KiB, one recipient, `plan.sessions`
sessions. A ratio is taken within a round; the summary rows give the
median over rounds and the range. Before each Postfix run a small probe
records concurrent fsyncs per second (Postfix fsyncs every queue file).
With a proper warm-up Postfix's rate did not follow it (probe 895-12,572
fsync/s, Postfix 1,344-1,641 msg/s, 10:01 run): the earlier swings were its
ramp-up and queue state, not the disk.

`paired_e2e` does the same for end-to-end throughput: smtp-source into the
leader (or into Postfix), relay host an smtp-sink on loopback, rate = messages
over the time from smtp-source's start until the sink has all of them. Each
system starts fresh and cold in every round (no warm-up: a warm-up's backlog
would still be relaying), in an order rotated every round.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import postfix
from bench.plan import KIB, SMTP_SOURCE, WORKERS, Baseline, Plan, Results, Step, bench_cluster
from bench.runners import HOST, Row, null_server
from tests.support.cluster import free_ports

NULL = "aiosmtpd null handler, uvloop"
IN_NODE = "mqnode 3 nodes, to leader"
IN_WORKERS = "mqnode 3 nodes, 2 smtp workers, to leader"
# The same code and fsyncs with no peers: what consensus costs, within the round.
SINGLE = "mqnode 1 node, no replication, 2 smtp workers"
POSTFIX = "Postfix accept"
SYSTEMS = (NULL, IN_NODE, IN_WORKERS, SINGLE, POSTFIX)
# With --baseline-tree, a sixth: that older checkout with 2 smtp workers (Baseline).
BASELINE = "mqnode {commit}, 3 nodes, 2 smtp workers, to leader"
E2E_BASELINE = "mqnode {commit}, 3 nodes, 2 smtp workers, delivered to sink"
E2E_IN_NODE = "mqnode 3 nodes, delivered to sink"
E2E_IN_WORKERS = "mqnode 3 nodes, 2 smtp workers, delivered to sink"
POSTFIX_E2E = "Postfix end to end"
E2E_SYSTEMS = (E2E_IN_NODE, E2E_IN_WORKERS, POSTFIX_E2E)
# Unmeasured messages through each system first, as a multiple of the measured count.
# Postfix ramps up (it spawns smtpd, cleanup and smtp processes on demand): five
# back-to-back chunks of 5,000 into one instance ran at 808, 1,246, 1,607, 1,566,
# 1,503 msg/s (and 1,126 ... 1,724), while mqnode's first chunk is already at its
# rate. With a 200-message warm-up Postfix was measured in its ramp (median 920);
# after a drained warm-up, in its slow empty-queue state (median 851): the measured
# run now follows the warm-up at once (postfix.measure_postfix).
WARMUP_CHUNKS = 2


def _baseline_row(plan: Plan, template: str) -> str | None:
    """The name of the baseline checkout's row (`template` with its commit), if any."""
    return None if plan.baseline is None else template.format(commit=plan.baseline.commit)


def systems(plan: Plan) -> tuple[str, ...]:
    """paired's systems: with a baseline tree, that checkout's row too."""
    row = _baseline_row(plan, BASELINE)
    return SYSTEMS if row is None else (*SYSTEMS, row)


def e2e_systems(plan: Plan) -> tuple[str, ...]:
    """paired-e2e's systems: with a baseline tree, that checkout's row too."""
    row = _baseline_row(plan, E2E_BASELINE)
    return E2E_SYSTEMS if row is None else (*E2E_SYSTEMS, row)


def _baseline_refs(plan: Plan, template: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The baseline row as a reference of its own ("x <commit>"), if there is one."""
    row = _baseline_row(plan, template)
    if row is None or plan.baseline is None:
        return (), {}
    return (row,), {row: f"x {plan.baseline.commit}"}


def paired(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    def measure(name: str, messages: int, row: Row, base: Path) -> float:
        if name == POSTFIX:  # the disk it fsyncs every queue file to, for the record
            row.extra["fsync/s, 20 threads"] = round(fsync_rate())
        return _measure(name, plan, base, messages)

    refs, labels = _baseline_refs(plan, BASELINE)
    rounds("paired", systems(plan), measure, plan, tmp, step, out, (POSTFIX, NULL, *refs), labels)


def paired_e2e(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    def measure(name: str, messages: int, row: Row, base: Path) -> float:
        if name == POSTFIX_E2E:
            _, e2e = postfix.measure_postfix(messages, plan.sessions, KIB, max_s=plan.max_s)
            return e2e.rate
        old = name not in E2E_SYSTEMS  # the baseline's row
        workers = old or name == E2E_IN_WORKERS
        got, span = mqnode_end_to_end(
            base / ("baseline" if old else "workers" if workers else "node"),
            messages,
            plan,
            workers,
            plan.baseline if old else None,
        )
        if got < messages:
            raise postfix.PostfixBenchError(f"smtp-sink got {got} of {messages} in time")
        return got / span

    refs, labels = _baseline_refs(plan, E2E_BASELINE)
    rounds(
        "paired-e2e", e2e_systems(plan), measure, plan, tmp, step, out, (POSTFIX_E2E, *refs), labels
    )


Measure = Callable[[str, int, Row, Path], float]


def rounds(
    workload: str,
    systems: tuple[str, ...],
    measure: Measure,
    plan: Plan,
    tmp: Path,
    step: Step,
    out: Results,
    refs: tuple[str, ...],
    labels: dict[str, str] | None = None,
) -> None:
    """`plan.paired_rounds` rounds of every system, order rotated each round; then summaries
    with each system's ratio to every one of `refs` (named as `labels` says)."""
    why = postfix.available()
    if why is not None:
        step(f"{workload}: skipped ({why})")
        out.rows.append(Row(workload, systems[-1], note=f"skipped: {why}"))
        return
    messages = plan.count_for(KIB)
    params: dict[str, Any] = {"messages": messages, "sessions": plan.sessions, "size": KIB}
    params["generator"] = SMTP_SOURCE
    rates: dict[str, list[float | None]] = {name: [] for name in systems}
    for r in range(plan.paired_rounds):
        turn = r % len(systems)
        for name in systems[turn:] + systems[:turn]:
            step(f"{workload}: round {r + 1}/{plan.paired_rounds}, {name}")
            row = Row(workload, name, {**params, "round": r + 1})
            try:
                row.rate = measure(name, messages, row, tmp / f"round{r + 1}")
                row.acked = row.attempted = messages
            except postfix.PostfixBenchError as exc:
                row.note = f"failed: {exc}"
            rates[name].append(row.rate)
            out.rows.append(row)
    out.rows += summary(rates, params, workload, refs, labels)


def mqnode_end_to_end(
    base: Path, messages: int, plan: Plan, workers: bool, baseline: Baseline | None = None
) -> tuple[int, float]:
    """smtp-source into a fresh 3-node cluster's leader (on `baseline`'s code if given),
    relay host a loopback smtp-sink.

    Returns (messages the sink got, seconds from smtp-source's start until it had
    them all, or until `plan.max_s` after smtp-source ended). Raises
    PostfixBenchError if smtp-source fails.
    """
    port = free_ports(1)[0]
    extra = WORKERS if workers else ()
    with (
        postfix.smtp_sink(port) as sink,
        bench_cluster(base, 3, relay=f"{HOST}:{port}", extra=extra, baseline=baseline) as c,
    ):
        before = sink.received()
        t0 = time.monotonic()
        postfix.run_source(
            c.nodes[c.leader()].smtp_port, messages, plan.sessions, KIB, max_s=plan.max_s
        )
        sink.wait_for(before + messages, plan.max_s)
        return sink.received() - before, time.monotonic() - t0


def fsync_rate(threads: int = 20, each: int = 25) -> float:
    """Small-file fsyncs per second from `threads` writers, in the system's temp dir.

    The disk's state next to each Postfix row (it swung from ~900 to ~12,500
    within minutes here); Postfix fsyncs every queue file, mqnode once a batch.
    """
    with tempfile.TemporaryDirectory(prefix="bench-fsync-") as d:

        def write(i: int) -> None:
            for j in range(each):
                with open(os.path.join(d, f"{i}-{j}"), "wb") as fh:
                    fh.write(b"x" * 1500)
                    fh.flush()
                    os.fsync(fh.fileno())

        workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return threads * each / (time.monotonic() - t0)


def _measure(name: str, plan: Plan, base: Path, messages: int) -> float:
    def source(port: int, count: int) -> float:
        return postfix.run_source(port, count, plan.sessions, KIB, max_s=plan.max_s)[1]

    warmup = WARMUP_CHUNKS * messages

    def through(port: int) -> float:
        source(port, warmup)
        return source(port, messages)

    if name == POSTFIX:
        accept, _ = postfix.measure_postfix(
            messages, plan.sessions, KIB, max_s=plan.max_s, warmup=warmup
        )
        return accept.rate
    if name == NULL:
        port = free_ports(1)[0]
        with null_server(port, uvloop=True):
            return through(port)
    old = plan.baseline if name not in SYSTEMS else None
    extra = WORKERS if name in (IN_WORKERS, SINGLE) or old is not None else ()
    nodes = 1 if name == SINGLE else 3
    where = base / name.replace(" ", "-").replace(",", "")
    with bench_cluster(where, nodes, extra=extra, baseline=old) as c:
        return through(c.nodes[c.leader()].smtp_port)


def summary(
    rates: dict[str, list[float | None]],
    params: dict[str, Any],
    workload: str = "paired",
    refs: tuple[str, ...] = (POSTFIX, NULL),
    labels: dict[str, str] | None = None,
) -> list[Row]:
    """One row per system: median rate over rounds; ratios per round, median and range."""
    labels = {
        POSTFIX: "x Postfix",
        NULL: "x null handler",
        POSTFIX_E2E: "x Postfix",
        **(labels or {}),
    }
    rows = []
    for name, mine in rates.items():
        ok = [x for x in mine if x]
        row = Row(workload, name, {**params, "round": "median"})
        row.rate = statistics.median(ok) if ok else None
        row.acked, row.attempted = len(ok) * params["messages"], len(mine) * params["messages"]
        notes = [f"{len(ok)} of {len(mine)} rounds"]
        for ref in refs:
            if ref != name:
                notes.append(f"{labels[ref]} per round {_spread(mine, rates[ref])}")
        row.note = "; ".join(notes)
        rows.append(row)
    return rows


def _spread(mine: list[float | None], refs: list[float | None]) -> str:
    ratios = sorted(a / b for a, b in zip(mine, refs, strict=True) if a and b)
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
