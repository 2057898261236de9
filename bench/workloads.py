"""The workloads of the bench suite, each measured against its references in one run.

  accept     msg/s answered 250: aiosmtpd null handler (plain asyncio and uvloop),
             one mqnode with replication off (a single-node cluster: same code,
             same fsyncs, no peers), a 3-node cluster submitting to the leader and
             to the followers; Postfix and smtp-source rows when installed
  e2e        msg/s until a local sink received everything (3 nodes, relay host)
  latency    DATA-to-250 p50/p99 at 50% and 90% of the measured 3-node peak; 100 KiB at
             50% of its peak, delivering to smtp-sink and with the queue growing
  failover   kill -9 the leader under load: seconds from the last 250 before the
             kill to the first after, lost (must be 0), duplicated queue entries
  scaling    the message-size curve (1 KiB .. 5 MiB) and 3 vs 5 nodes
  sessions   acceptance against the number of sessions (bench/workloads.py)
  paired     the 1 KiB acceptance ratios, measured in back-to-back rounds (bench/paired.py)
  paired-e2e the 1 KiB end-to-end ratios to Postfix, in back-to-back rounds (bench/paired.py)
  paired-dkim what DKIM signing (RSA-2048, Ed25519) costs acceptance, against Postfix
             signing through the OpenDKIM milter, in rounds (bench/paired_dkim.py)
  paired-suppression acceptance with a 1M-entry suppression list against an empty one,
             in rounds (bench/paired_suppression.py)
  shaping    a backlog for a rate-limited site drains at its rate while other mail
             goes (bench/shaping_drain.py)
  paired-api the HTTP injection API's acceptance against SMTP's, single messages and
             batches of 100, in rounds (bench/paired_api.py)
  cost       CPU and bytes written per message on the accepting machine, against
             Postfix's, at 1 KiB and 100 KiB (bench/cost.py)
  paired-large 100 KiB, 1 MiB and 5 MiB through mqnode and Postfix, accepted and
             delivered, in rounds (bench/paired_large.py)
  deep       fresh mail's rates, memory, snapshot and catch-up times and queue
             commands with 1,000,000 messages deferred for a dead destination,
             against an empty queue (bench/deep_queue.py)

Nodes run with their production defaults (election timeout 400-1400 ms,
heartbeat 100 ms), not the short test tuning: failover figures are what an
operator would see. Every node has `--no-delivery-enabled` except where a
relay host is given (e2e, the delivering latency rows): a sink on 127.0.0.1,
so nothing leaves loopback. Every run is bounded by a message count and a time limit.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import postfix
from bench.cost import cost
from bench.deep_queue import deep
from bench.paired import mqnode_end_to_end, paired, paired_e2e
from bench.paired_api import paired_api
from bench.paired_dkim import paired_dkim
from bench.paired_large import paired_large
from bench.paired_suppression import paired_suppression
from bench.plan import (
    FULL,
    KIB,
    MIB,
    OURS,
    QUICK,
    SMTP_SOURCE,
    WORKERS,
    Plan,
    Results,
    Step,
    bench_cluster,
    targets,
)
from bench.runners import (
    HOST,
    Row,
    measure,
    null_server,
    row_from,
    run_load,
    wait_sink,
)
from bench.shaping_drain import shaping
from tests.support.chaos import kill_leader_repeatedly, run_scenario
from tests.support.cluster import free_ports


def accept(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    for size in plan.sizes:
        for rcpts in plan.recipients:
            params = {
                "messages": plan.count_for(size),
                "sessions": plan.sessions,
                "size": size,
                "recipients": rcpts,
            }
            _accept_one(plan, tmp / f"accept-{size}-{rcpts}", params, step, out)


def _accept_one(plan: Plan, base: Path, params: dict[str, Any], step: Step, out: Results) -> None:
    port = free_ports(1)[0]
    for uv in (False, True):
        name = "aiosmtpd null handler" + (", uvloop" if uv else "")
        step(f"accept: {name}")
        with null_server(port, uvloop=uv):
            _both(plan, name, [(HOST, port)], params, out)
    step("accept: mqnode, 1 node (replication off)")
    with bench_cluster(base / "single", 1) as c:
        _both(plan, "mqnode 1 node, no replication", targets(c, [0]), params, out)
    step("accept: mqnode, 3 nodes")
    with bench_cluster(base / "three", 3) as c:
        _both(plan, "mqnode 3 nodes, to leader", targets(c, [c.leader()]), params, out)
        _both(plan, "mqnode 3 nodes, to followers", targets(c, c.followers()), params, out)
    step("accept: mqnode, 3 nodes, 2 smtp workers each")
    with bench_cluster(base / "three-workers", 3, extra=WORKERS) as c:
        name = "mqnode 3 nodes, 2 smtp workers"
        _both(plan, f"{name}, to leader", targets(c, [c.leader()]), params, out)
        _both(plan, f"{name}, to followers", targets(c, c.followers()), params, out)
    step("accept: Postfix and smtp-source references")
    for ref in postfix.reference_rows(
        params["messages"],
        params["sessions"],
        params["size"],
        params["recipients"],
        max_s=plan.max_s,
    ):
        workload = "e2e" if ref.name == "Postfix end to end" else "accept"
        ok = ref.rate == ref.rate  # NaN when skipped or failed
        out.rows.append(
            Row(
                workload,
                ref.name,
                {**params, "generator": SMTP_SOURCE},
                rate=ref.rate if ok else None,
                acked=ref.messages if ok else 0,
                attempted=ref.messages,
                note=ref.note,
            )
        )


def _both(
    plan: Plan, name: str, targets: list[tuple[str, int]], params: dict[str, Any], out: Results
) -> None:
    """One row from our generator (rate and latency) and, when installed, one from smtp-source.

    Postfix's rows are driven by smtp-source, a C client that costs the shared
    CPUs far less than our Python generator; ratios to Postfix are taken
    between rows of the same generator. smtp-source talks to the first target.
    """
    out.rows.append(measure("accept", name, targets, {**params, "generator": OURS}, plan.max_s))
    if postfix.available(instance=False) is not None:
        return
    p = {**params, "generator": SMTP_SOURCE}
    try:
        rate = _run_source(targets[0][1], p, plan)
    except postfix.PostfixBenchError as exc:
        out.rows.append(Row("accept", name, p, note=f"failed: {exc}"))
        return
    out.rows.append(Row("accept", name, p, rate=rate, acked=p["messages"], attempted=p["messages"]))


def end_to_end(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    size, rcpts = KIB, 1
    params = {
        "messages": plan.count_for(size),
        "sessions": plan.sessions,
        "size": size,
        "recipients": rcpts,
    }
    step("e2e: mqnode 3 nodes -> relay sink")
    port = free_ports(1)[0]
    count_file = tmp / "e2e-sink.count"
    with (
        null_server(port, count_file=count_file, uvloop=True),
        bench_cluster(tmp / "e2e", 3, relay=f"{HOST}:{port}") as c,
    ):
        started_wall = time.time()
        result, elapsed = run_load(
            targets(c, list(range(3))),
            params["messages"],
            plan.sessions,
            size,
            rcpts,
            plan.max_s,
            run_id="e2e",
        )
        acked = result.count(250)
        got = wait_sink(count_file, acked, timeout_s=max(60.0, acked / 20))
        accept_row = row_from("e2e", "mqnode 3 nodes, accepted", params, result, elapsed)
        span = got.last_s - started_wall
        row = Row(
            "e2e",
            "mqnode 3 nodes, delivered to sink",
            params,
            rate=got.messages / span if got.messages and span > 0 else None,
            acked=got.messages,
            attempted=acked,
            note="" if got.messages >= acked else f"sink got {got.messages} of {acked} acked",
        )
        out.rows.extend([accept_row, row])
    _end_to_end_smtp_source(plan, tmp, params, step, out)
    _end_to_end_smtp_source(plan, tmp, params, step, out, workers=True)
    _postfix_end_to_end(plan, params, step, out)


def _postfix_end_to_end(plan: Plan, params: dict[str, Any], step: Step, out: Results) -> None:
    """The Postfix end-to-end reference for these params, unless the accept step measured it
    (`--only e2e` then still has its ratio). Skipped, with a note, without Postfix."""
    p = {**params, "generator": SMTP_SOURCE}
    if any(r.name == "Postfix end to end" and r.params == p for r in out.rows):
        return
    step("e2e: Postfix end to end")
    why = postfix.available()
    if why is not None:
        out.rows.append(Row("e2e", "Postfix end to end", p, note=f"skipped: {why}"))
        return
    try:
        _, ref = postfix.measure_postfix(
            p["messages"], p["sessions"], p["size"], p["recipients"], max_s=plan.max_s
        )
    except postfix.PostfixBenchError as exc:
        out.rows.append(Row("e2e", "Postfix end to end", p, note=f"failed: {exc}"))
        return
    out.rows.append(
        Row(
            "e2e",
            ref.name,
            p,
            rate=ref.rate,
            acked=ref.messages,
            attempted=ref.messages,
            note=ref.note,
        )
    )


def _run_source(port: int, p: dict[str, Any], plan: Plan) -> float:
    """smtp-source with a row's params into 127.0.0.1:port; msg/s (raises PostfixBenchError)."""
    _elapsed, rate = postfix.run_source(
        port, p["messages"], p["sessions"], p["size"], p["recipients"], max_s=plan.max_s
    )
    return rate


def _end_to_end_smtp_source(
    plan: Plan, tmp: Path, params: dict[str, Any], step: Step, out: Results, workers: bool = False
) -> None:
    """The Postfix end-to-end row's set-up with mqnode in Postfix's place.

    smtp-source into the leader, relay host smtp-sink: the same C generator
    and sink as "Postfix end to end", so the two rates compare (our Python
    generator and sink above cost the shared CPUs more). Skipped when the
    tools are not installed.
    """
    if postfix.available(instance=False) is not None:
        return
    nodes = "mqnode 3 nodes, 2 smtp workers" if workers else "mqnode 3 nodes"
    step(f"e2e: smtp-source -> {nodes} -> smtp-sink")
    p = {**params, "generator": SMTP_SOURCE}
    name = f"{nodes}, delivered to sink"
    base = tmp / ("e2e-smtp-source-workers" if workers else "e2e-smtp-source")
    try:
        got, span = mqnode_end_to_end(base, p["messages"], plan, workers)
    except postfix.PostfixBenchError as exc:
        out.rows.append(Row("e2e", name, p, note=f"failed: {exc}"))
        return
    drained = got >= p["messages"]
    out.rows.append(
        Row(
            "e2e",
            name,
            p,
            rate=got / span if drained else None,
            acked=got,
            attempted=p["messages"],
            note="" if drained else f"smtp-sink got {got} of {p['messages']} in time",
        )
    )


LATENCY_BIG = 100 * KIB


def latency(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    peaks = [
        r.rate
        for r in out.rows
        if r.workload == "accept" and r.name == "mqnode 3 nodes, to leader" and r.rate
    ]
    params: dict[str, Any] = {"sessions": plan.sessions, "size": KIB, "recipients": 1}
    big = {**params, "size": LATENCY_BIG}
    with bench_cluster(tmp / "latency", 3) as c:
        target = targets(c, [c.leader()])
        if not peaks:
            step("latency: measuring the peak first")
            peaks = [measure("accept", "peak", target, {**params, "messages": 1500}, 60).rate or 0]
        for frac in (0.5, 0.9):
            _latency_at(plan, step, out, target, params, peaks[0], frac, f"{int(frac * 100)}")
        # Nothing is delivered here: the queue grows by every message (several hundred MB
        # by the end), and each member's snapshots copy all of it.
        step("latency: the 100 KiB peak, nothing delivered")
        peak_row = measure(
            "latency", "mqnode 3 nodes, queue growing, peak", target, _peak_params(big), 90
        )
        out.rows.append(peak_row)
        _latency_at(
            plan,
            step,
            out,
            target,
            big,
            peak_row.rate or 0,
            0.5,
            "100k_50_queued",
            ", queue growing,",
        )
    _latency_delivering(plan, tmp, step, out, big)


def _latency_delivering(
    plan: Plan, tmp: Path, step: Step, out: Results, big: dict[str, Any]
) -> None:
    """100 KiB (the size bulk mail is benchmarked at) at half of its own peak, in a cluster
    that relays what it accepts to a loopback smtp-sink, as a node at half its capacity
    does: its queue stays short. The peak is measured first, in the same cluster, with the
    same generator (its CPU is part of what limits it)."""
    why = postfix.available(instance=False)
    if why is not None:
        name = "mqnode 3 nodes delivering, at 50% of peak"
        out.rows.append(Row("latency", name, {**big, "generator": OURS}, note=f"skipped: {why}"))
        return
    port = free_ports(1)[0]
    with (
        postfix.smtp_sink(port) as sink,
        bench_cluster(tmp / "latency-delivering", 3, relay=f"{HOST}:{port}") as c,
    ):
        target = targets(c, [c.leader()])
        step("latency: the 100 KiB peak, delivering to smtp-sink")
        peak_row = measure(
            "latency", "mqnode 3 nodes delivering, peak", target, _peak_params(big), 90
        )
        out.rows.append(peak_row)
        row = _latency_at(
            plan, step, out, target, big, peak_row.rate or 0, 0.5, "100k_50", " delivering,"
        )
        row.note = f"smtp-sink had {sink.received():,} of {row.acked + peak_row.acked:,} at the end"


def _peak_params(params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "messages": 1500}


def _latency_at(
    plan: Plan,
    step: Step,
    out: Results,
    target: list[tuple[str, int]],
    params: dict[str, Any],
    peak: float,
    frac: float,
    series: str,
    kind: str = "",
) -> Row:
    """An open-loop load at `frac` of `peak`: a row and the sorted DATA-to-250 times."""
    rate = max(peak * frac, 1.0)
    size = int(params["size"])
    step(f"latency: {size // KIB} KiB at {frac:.0%} of peak ({rate:.0f} msg/s)")
    p = {**params, "messages": int(rate * plan.latency_s), "offered_per_s": round(rate)}
    result, elapsed = run_load(
        target, p["messages"], 200, size, 1, plan.latency_s * 3, rate, run_id=f"lat{series}"
    )
    row = row_from("latency", f"mqnode 3 nodes{kind} at {frac:.0%} of peak", p, result, elapsed)
    out.rows.append(row)
    out.series[f"latency_ms_{series}"] = sorted(
        a.data_s * 1000 for a in result.attempts if a.code == 250
    )
    return row


def failover(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    gaps: list[float] = []
    lost = dup = acked = attempted = 0
    with bench_cluster(tmp / "failover", 3) as c:
        for r in range(plan.failover_rounds):
            step(f"failover: kill -9 the leader, round {r + 1}/{plan.failover_rounds}")
            report, result, ctx = run_scenario(
                f"failover-{r}",
                c,
                kill_leader_repeatedly(rounds=1, every_s=3.0, down_s=3.0),
                seed=r,
                load_s=9.0,
                concurrency=plan.sessions,
            )
            gap = outage_s(result, ctx.marks.get("fault"))
            if gap is not None:
                gaps.append(round(gap, 3))
            lost += report.lost
            dup += report.duplicated
            acked += report.acknowledged
            attempted += report.attempted
            if r == 0:
                out.series["failover_timeline"] = _timeline(result, ctx.marks.get("fault"))
    out.rows.append(
        Row(
            "failover",
            "mqnode 3 nodes, kill -9 leader",
            {"rounds": plan.failover_rounds, "sessions": plan.sessions, "size": KIB},
            acked=acked,
            attempted=attempted,
            extra={
                "failover_s_median": statistics.median(gaps) if gaps else None,
                "failover_s_max": max(gaps) if gaps else None,
                "failover_s": gaps,
                "lost": lost,
                "duplicated": dup,
            },
        )
    )


def outage_s(result: Any, fault_at: float | None, window_s: float = 8.0) -> float | None:
    """The longest stretch without a 250 that starts or ends within `window_s` of the kill.

    "Last 250 before the kill to the first after" reads ~0 here: replies already
    committed are still on their way when the leader dies. The longest silence
    around the kill is what a client sees as the failover.
    """
    if fault_at is None:
        return None
    ends = sorted(a.end_s for a in result.attempts if a.code == 250)
    gaps = [b - a for a, b in itertools.pairwise(ends) if b > fault_at and a < fault_at + window_s]
    return max(gaps) if gaps else None


def _timeline(result: Any, fault_at: float | None, bin_s: float = 0.1) -> dict[str, Any]:
    ends = sorted(a.end_s for a in result.attempts if a.code == 250)
    if not ends:
        return {"t_s": [], "rate": [], "fault_s": None}
    t0 = min(a.start_s for a in result.attempts)
    bins: dict[int, int] = {}
    for e in ends:
        bins[int((e - t0) / bin_s)] = bins.get(int((e - t0) / bin_s), 0) + 1
    last = max(bins)
    return {
        "t_s": [round(i * bin_s, 3) for i in range(last + 1)],
        "rate": [bins.get(i, 0) / bin_s for i in range(last + 1)],
        "fault_s": None if fault_at is None else round(fault_at - t0, 3),
    }


def scaling(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    with bench_cluster(tmp / "sizes", 3) as c:
        target = targets(c, [c.leader()])
        for size in plan.scaling_sizes:
            step(f"scaling: {size // KIB} KiB messages")
            sessions = plan.sessions if size <= 100 * KIB else 4
            params = {"messages": plan.count_for(size), "sessions": sessions, "size": size}
            row = measure("scaling", f"mqnode 3 nodes, {_size(size)}", target, params, plan.max_s)
            row.extra["MiB_per_s"] = round((row.rate or 0) * size / MIB, 2)
            out.rows.append(row)
    for n in plan.node_counts:
        step(f"scaling: {n} nodes")
        params = {"messages": plan.count_for(KIB), "sessions": plan.sessions, "size": KIB}
        with bench_cluster(tmp / f"nodes-{n}", n) as c:
            target = targets(c, [c.leader()])
            out.rows.append(measure("scaling", f"node count {n}, 1 KiB", target, params, 60))


def sessions(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    """Acceptance against the number of parallel sessions, 1 KiB, smtp-source throughout.

    A client waits for each 250 before its next message, so with few sessions
    the rate is bound by the time to a 250 (for mqnode: a majority's fsync and
    two ticks), with many by CPU. The curve shows which bound a row is on, for
    mqnode and Postfix side by side; the targets stay at 20 sessions.
    """
    if postfix.available(instance=False) is not None:
        step("sessions: skipped (no smtp-source)")
        return
    messages = plan.count_for(KIB)
    port = free_ports(1)[0]
    rows: dict[int, list[Row]] = {n: [] for n in plan.session_counts}

    def add(name: str, n: int, rate: Callable[[], float]) -> None:
        p: dict[str, Any] = {"messages": messages, "sessions": n, "size": KIB, "recipients": 1}
        p["generator"] = SMTP_SOURCE
        try:
            r = Row("sessions", name, p, rate=rate(), acked=messages, attempted=messages)
        except postfix.PostfixBenchError as exc:
            r = Row("sessions", name, p, note=f"failed: {exc}")
        rows[n].append(r)

    def source(port: int, n: int) -> Callable[[], float]:
        return lambda: postfix.run_source(port, messages, n, KIB, max_s=plan.max_s)[1]

    step("sessions: aiosmtpd null handler, uvloop")
    with null_server(port, uvloop=True):
        for n in plan.session_counts:
            add("aiosmtpd null handler, uvloop", n, source(port, n))
    step("sessions: mqnode 3 nodes")
    with bench_cluster(tmp / "three", 3) as c:
        leader = c.nodes[c.leader()].smtp_port
        for n in plan.session_counts:
            add("mqnode 3 nodes, to leader", n, source(leader, n))
    why = postfix.available()
    for n in plan.session_counts:
        step(f"sessions: Postfix, {n} sessions")
        if why is not None:
            note = f"skipped: {why}"
            rows[n].append(Row("sessions", "Postfix accept", {"sessions": n}, note=note))
            continue

        def through_postfix(n: int = n) -> float:
            return postfix.measure_postfix(messages, n, KIB, max_s=plan.max_s)[0].rate

        add("Postfix accept", n, through_postfix)
    for n in plan.session_counts:
        out.rows += rows[n]


def _size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


WORKLOADS: dict[str, Callable[[Plan, Path, Step, Results], None]] = {
    "accept": accept,
    "e2e": end_to_end,
    "latency": latency,
    "failover": failover,
    "sessions": sessions,
    "scaling": scaling,
    "paired": paired,
    "paired-e2e": paired_e2e,
    "paired-dkim": paired_dkim,
    "paired-suppression": paired_suppression,
    "shaping": shaping,
    "paired-api": paired_api,
    "cost": cost,
    "deep": deep,
    "paired-large": paired_large,
}


def run(plan: Plan, names: list[str], step: Step) -> Results:
    out = Results()
    with tempfile.TemporaryDirectory(prefix="mqnode-bench-") as tmp:
        for name in names:
            base = Path(tmp) / name
            base.mkdir()
            WORKLOADS[name](plan, base, step, out)
    return out


__all__ = ["FULL", "QUICK", "WORKLOADS", "Plan", "Results", "bench_cluster", "run"]
