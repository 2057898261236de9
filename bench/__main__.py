"""The bench suite: mqnode against Postfix and the Python SMTP ceiling, side by side in one run.

    python -m bench [--full] [--record]
        [--only accept,e2e,latency,failover,sessions,scaling,paired,paired-e2e]

Quick mode (the default) takes about two minutes: 1 KiB messages, one
recipient, one leader kill. `--full` runs the whole matrix (1/10/100 KiB,
1 and 10 recipients, five leader kills, sizes to 5 MiB, 3 vs 5 nodes).
Writes `<stamp>-<mode>.json` and PNG plots named after it to `bench/results/`;
`--record` puts them in `docs/bench/` instead and appends the markdown
tables, with this exact command and links to the plots, to
`docs/benchmarks.md`.
Postfix rows need `postfix`, `smtp-source` and `smtp-sink` and root; without
them they are skipped with the reason in the table. Everything runs on
127.0.0.1; every load is bounded in count and time; every process started is
stopped by PID. The machines are shared and noisy: read the ratios, not the
absolute numbers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench import paired, postfix, report
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
        "paired": plan.paired_rounds * len(paired.SYSTEMS),
        "paired-e2e": plan.paired_rounds * len(paired.E2E_SYSTEMS),
    }
    return sum(per[n] for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--full", action="store_true", help="the whole matrix (tens of minutes)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    ap.add_argument(
        "--out", type=Path, help="JSON directory (bench/results; docs/bench with --record)"
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)} (have: {', '.join(WORKLOADS)})")
    plan = FULL if args.full else QUICK
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
    out_dir = args.out or (DOCS / "bench" if args.record else Path("bench/results"))
    json_path = out_dir / f"{stamp}-{plan.mode}.json"
    report.write_json(json_path, meta, results.rows, results.series)
    pngs = report.plots(out_dir, f"{stamp}-{plan.mode}", results.series)
    text = report.markdown(command.strip(), meta, results.rows)
    if pngs:
        links = (f"![{p.stem}]({p.relative_to(DOCS) if args.record else p})" for p in pngs)
        text += "\n" + "\n".join(links) + "\n"
    print(text)
    print(f"results: {json_path}; plots: {', '.join(str(p) for p in pngs) or 'none'}")
    if args.record:
        with open(DOCS / "benchmarks.md", "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
