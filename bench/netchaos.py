"""A long random schedule of real network faults on namespaced nodes, into docs/reliability.md.

    python -m bench.netchaos [--minutes 30] [--seed N] [--out docs/reliability.md] [--json F]

One 3-node cluster, each node in its own network namespace (tests/support/
netlab.py), delivering to a sink in its namespace, under SMTP load on every
node for the whole run. Rounds follow each other until the time is up; each
round draws a fault (seeded) with random durations from: isolate the leader,
cut a follower from the leader, cut the followers from each other, one-way
drops either way, flapping links, 50 ms RTT with 1% loss, kill -9 of the
leader at the heal, a cut during a leadership transfer. After each heal the
checker of tests/support/netfaults.py measures safety and liveness; the
table sums the rounds per fault. The section between the markers in the
output file is replaced; the rest of the file is kept. Needs root and
iptables. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import netlab
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.netfaults import (
    ACCEPT_BOUND_S,
    NetReport,
    NetScript,
    cut_follower_from_leader,
    cut_followers_from_each_other,
    flapping,
    isolate_leader,
    kill_during_heal,
    lossy_slow,
    one_way,
    partition_during_transfer,
    run_net_scenario,
)
from tests.support.netlab import NetLab

ARGS = (*FAST_TUNING, "--log-compaction-min-entries", "150")
BEGIN = "<!-- netchaos:begin -->"
END = "<!-- netchaos:end -->"

# name -> (the fault for a duration, the range of durations drawn, load seconds beyond it)
FAULTS: dict[str, tuple[Callable[[float], NetScript], tuple[float, float], float]] = {
    "isolate-leader": (lambda s: isolate_leader(1.0, s), (3, 15), 2.5),
    "cut-follower-from-leader": (lambda s: cut_follower_from_leader(1.0, s), (3, 15), 2.5),
    "cut-followers": (lambda s: cut_followers_from_each_other(1.0, s), (3, 10), 2.5),
    "one-way-from-leader": (lambda s: one_way(1.0, s, from_leader=True), (3, 10), 2.5),
    "one-way-to-leader": (lambda s: one_way(1.0, s, from_leader=False), (3, 10), 2.5),
    "flapping": (lambda s: flapping(1.0, s), (10, 60), 2.5),
    "rtt50-loss1": (lambda s: lossy_slow(1.0, s, 50.0, 0.01), (5, 20), 2.5),
    "kill-9-during-heal": (lambda s: kill_during_heal(1.0, s), (3, 10), 4.0),
    "cut-during-transfer": (lambda s: partition_during_transfer(1.0, s), (3, 10), 2.5),
}


def run(minutes: float, seed: int, progress: Callable[[str], None]) -> list[NetReport]:
    rng = random.Random(seed)
    reports: list[NetReport] = []
    end = time.monotonic() + minutes * 60
    with tempfile.TemporaryDirectory(prefix="netchaos-") as tmp, NetLab(3, Path(tmp)) as lab:
        lab.start_sinks()
        relay = f"127.0.0.1:{netlab.SINK_PORT}"
        with Cluster(Path(tmp), extra_args=ARGS, relay_host=relay, netlab=lab) as cluster:
            for round_ in range(10_000):
                if time.monotonic() >= end:
                    break
                name = rng.choice(sorted(FAULTS))
                make, (low, high), extra_s = FAULTS[name]
                hold_s = rng.uniform(low, high)
                script, load_s = make(hold_s), hold_s + extra_s
                t0 = time.monotonic()
                report = run_net_scenario(name, lab, cluster, script, rng.randrange(2**31), load_s)
                reports.append(report)
                progress(
                    f"round {round_} {name}: {report.acknowledged} acked, lost {report.lost}, "
                    f"dup {report.duplicates}, accept after heal {report.accept_after_heal_s}, "
                    f"drained {report.drained_s}, problems {report.problems()} "
                    f"({time.monotonic() - t0:.0f}s)"
                )
    return reports


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(reports: list[NetReport], command: str, minutes: float) -> list[str]:
    lines = [
        BEGIN,
        "## Network faults between namespaced nodes: a random schedule",
        "",
        "Each node in its own network namespace; faults from the kernel on the Raft links",
        "(link down, iptables drops one or both ways, loss, a user-space delay), clients on",
        "links of their own. Produced by:",
        "",
        f"    {command}",
        "",
        f"Machine: {platform.machine()}, 2 cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(reports)} rounds "
        f"in {minutes:g} minutes.",
        "",
        "| fault | rounds | attempted | acked | lost | minority acks | duplicates (max/round) "
        "| leader changes | resurrected | still queued | 250 on every node after heal s "
        "(median / max) | drained s (max) | all ready after heal s (max) | failed rounds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
        "| ---: | ---: |",
    ]
    by: dict[str, list[NetReport]] = {}
    for r in reports:
        by.setdefault(r.scenario, []).append(r)
    for name in sorted(by):
        rs = by[name]
        accept = [max((v for v in r.accept_after_heal_s.values() if v is not None), default=0.0)
                  if None not in r.accept_after_heal_s.values() else float("inf")
                  for r in rs]  # fmt: skip
        drained = [r.drained_s for r in rs if r.drained_s is not None]
        ready = [r.ready_after_heal_s for r in rs if r.ready_after_heal_s is not None]
        lines.append(
            f"| {name} | {len(rs)} | {sum(r.attempted for r in rs)} "
            f"| {sum(r.acknowledged for r in rs)} | {sum(r.lost for r in rs)} "
            f"| {sum(r.minority_acks for r in rs)} "
            f"| {sum(r.duplicates for r in rs)} ({max(r.duplicates for r in rs)}) "
            f"| {sum(r.leader_changes for r in rs)} | {sum(r.resurrected for r in rs)} "
            f"| {sum(r.still_queued for r in rs)} "
            f"| {_fmt(statistics.median(accept))} / {_fmt(max(accept))} "
            f"| {_fmt(max(drained) if drained else None)} "
            f"| {_fmt(max(ready) if ready else None)} "
            f"| {sum(1 for r in rs if not r.ok())} |"
        )
    lines += [
        "",
        "A round: load on every node, one fault, the heal, then the checks of",
        "tests/fault/test_net_faults.py: nothing acknowledged lost; no 250 from a node cut",
        "off from every majority; duplicates (deliveries of one Message-ID beyond the first)",
        "at most the delivery concurrency (20) per leader change; nothing delivered and",
        f"queued again; every node answering 250 within {ACCEPT_BOUND_S:g} s of the heal;",
        "the queue drained; /readyz 200 on every node after the heal. `inf` in the accept",
        "column: a node never answered 250 after that heal (a liveness failure).",
        END,
    ]
    return lines


def write(out: Path, section: list[str]) -> None:
    try:
        text = out.read_text()
    except FileNotFoundError:
        text = ""
    block = "\n".join(section)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.netchaos", description=__doc__)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    ap.add_argument("--json", type=Path, help="also write the raw reports as JSON")
    args = ap.parse_args(argv)
    why_not = netlab.available()
    if why_not:
        print(f"cannot run: {why_not}", file=sys.stderr)
        return 2
    command = f"python -m bench.netchaos --minutes {args.minutes:g} --seed {args.seed}"
    reports = run(args.minutes, args.seed, lambda s: print(s, file=sys.stderr, flush=True))
    write(args.out, table(reports, command, args.minutes))
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    bad = [r for r in reports if not r.ok()]
    print(f"wrote {args.out}; {len(bad)} of {len(reports)} rounds failed", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
