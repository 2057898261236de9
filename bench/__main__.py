"""The bench suite: mqnode against Postfix and the Python SMTP ceiling, side by side in one run.

    python -m bench [--full] [--record] [--baseline-tree DIR]
        [--only accept,e2e,latency,failover,sessions,scaling,paired,paired-e2e,paired-dkim,
         paired-suppression,shaping,paired-api,cost,deep,paired-large]

Quick mode (the default) takes about two minutes: 1 KiB messages, one
recipient, one leader kill. `--full` runs the whole matrix (1/10/100 KiB,
1 and 10 recipients, five leader kills, sizes to 5 MiB, 3 vs 5 nodes).
Writes `<stamp>-<mode>.json` and PNG plots named after it to `bench/results/`
(not kept in git). `--record` also rewrites, in `docs/benchmarks.md`, the
section of each workload it measured (table, this exact command, machine and
date), and puts the plots the page shows in `docs/bench/` under fixed names;
sections of workloads it did not run are left as they are.
Postfix rows need `postfix`, `smtp-source` and `smtp-sink` and root, and
paired-dkim's reference the `opendkim` daemon; without them they are skipped
with the reason in the table. Everything runs on
127.0.0.1; every load is bounded in count and time; every process started is
stopped by PID. The machines are shared and noisy: read the ratios, not the
absolute numbers. `--baseline-tree` adds an older checkout to the paired
rounds: a regression check that does not move with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import paired, paired_api, paired_dkim, paired_suppression, postfix, report
from bench.plan import Baseline
from bench.runners import Row
from bench.workloads import FULL, QUICK, WORKLOADS, Plan, run

DOCS = Path("docs")


def planned_steps(plan: Plan, names: list[str]) -> int:
    per = {
        "accept": len(plan.sizes) * len(plan.recipients) * 6,
        "e2e": 1,
        "latency": 2,
        "failover": plan.failover_rounds,
        "sessions": 2 + len(plan.session_counts),
        "scaling": len(plan.scaling_sizes) + len(plan.node_counts),
        "paired": plan.paired_rounds * len(paired.systems(plan)),
        "paired-e2e": plan.paired_rounds * len(paired.e2e_systems(plan)),
        "paired-dkim": plan.paired_rounds * len(paired_dkim.SYSTEMS),
        "paired-suppression": plan.paired_rounds * len(paired_suppression.SYSTEMS),
        "shaping": 2,
        "paired-api": plan.paired_rounds * len(paired_api.SYSTEMS),
        "cost": 4,
        "deep": 7,
        "paired-large": 5 * 2 * (3 if plan.mode == "full" else 1),
    }
    return sum(per[n] for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--full", action="store_true", help="the whole matrix (tens of minutes)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument(
        "--record",
        action="store_true",
        help="rewrite the measured workloads' sections of docs/benchmarks.md",
    )
    ap.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="JSON and plot directory"
    )
    ap.add_argument(
        "--shaping-backlog",
        type=int,
        default=0,
        metavar="N",
        help="messages queued for the paced site in the shaping workload (full: 100000)",
    )
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help="an older mqnode checkout (git worktree) that paired and paired-e2e also measure "
        "in every round, each ratio to it taken within the round",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)} (have: {', '.join(WORKLOADS)})")
    plan = FULL if args.full else QUICK
    if args.shaping_backlog > 0:
        plan = dataclasses.replace(plan, shaping_backlog=args.shaping_backlog)
    if args.baseline_tree is not None:
        plan = dataclasses.replace(plan, baseline=Baseline.at(args.baseline_tree.resolve()))
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = report.machine_meta(plan.mode, started)
    skip = postfix.available()
    if skip is not None:
        meta["note"] = f"Postfix rows skipped: {skip}."

    bar = tqdm(total=planned_steps(plan, names), unit="step", dynamic_ncols=True)

    def step(what: str) -> None:
        bar.set_description(what)
        bar.update(1)

    t0 = time.monotonic()
    try:
        results = run(plan, names, step)
    finally:
        bar.close()
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    json_path = args.out / f"{stamp}-{plan.mode}.json"
    report.write_json(json_path, meta, results.rows, results.series)
    pngs = report.plots(args.out, f"{stamp}-{plan.mode}", results.series)
    print(report.markdown(command.strip(), meta, results.rows))
    print(f"results: {json_path}; plots: {', '.join(str(p) for p in pngs) or 'none'}")
    if args.record:
        record(command.strip(), meta, results.rows, results.series)
        print(f"recorded in {DOCS / 'benchmarks.md'}")
    return 0


def record(command: str, meta: dict[str, object], rows: list[Row], series: dict[str, Any]) -> None:
    """Rewrite the measured workloads' sections of docs/benchmarks.md, with their plots."""
    plot_dir = DOCS / "bench"
    written = {p.stem: p for p in report.plots(plot_dir, "", series)}
    blocks = {}
    for workload in report.WORKLOAD_ORDER:
        if not any(r.workload == workload for r in rows):
            continue
        stem = report.PLOT_OF.get(workload)
        plot = written.get(stem) if stem else None
        link = str(plot.relative_to(DOCS)) if plot else None
        blocks[workload] = report.section(workload, command, dict(meta), rows, link)
    page = DOCS / "benchmarks.md"
    page.write_text(report.rewrite(page.read_text(encoding="utf-8"), blocks), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
