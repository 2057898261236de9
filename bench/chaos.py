"""Long fault runs: the fault suite's scenarios at length, written to docs/reliability.md.

The run replaces the file, keeping the section `python -m bench.netchaos` wrote
(between its markers) below the new table.

    python -m bench.chaos [--quick] [--seed N] [--out docs/reliability.md]

Scenarios (3 real nodes on 127.0.0.1, load over SMTP to every node,
compaction every 150 entries so restarts cross snapshot + log):
  kill-leader        kill -9 the leader every few seconds, restart it (10 rounds)
  kill-follower      kill -9 a follower, restart it
  kill-two           kill -9 two of three; no 250 may be given without a majority
  pause-leader-Nx    SIGSTOP the leader for 0.5x..20x the election timeout
  full-restart       kill -9 all three and restart, together and staggered (30 rounds)
  partition-leader   cut the leader off (transport drop hook) and heal
  power-loss         kill -9 all three, then tear each state's unsynced commits (another
                     boot's marker, garbled pages) as a kernel crash may; restart
  *-smtp-workers     kill-leader and full-restart-together with SMTP sessions in two
                     worker processes per node (smtp_workers = 2)
For each: attempted, acknowledged, refused, lost (must be 0), duplicated
queue entries (must be 0), diverged nodes (must be 0), failover seconds.
Every loop is bounded in count and time; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.chaos import (
    FaultScript,
    Report,
    acked_in_window,
    full_restart,
    kill_follower,
    kill_leader_repeatedly,
    kill_two,
    partition_follower,
    partition_leader,
    pause_leader,
    power_loss,
    run_scenario,
)
from tests.support.cluster import FAST_TUNING, Cluster

ARGS = (*FAST_TUNING, "--log-compaction-min-entries", "150", "--fault-injection")
ELECTION_MAX_S = 0.6
WORKERS = ("--smtp-workers", "2")


def scenarios(quick: bool) -> list[tuple[str, FaultScript, float, tuple[str, ...]]]:
    k = 0.25 if quick else 1.0
    rounds_restart = 3 if quick else 30
    rounds_kill = 3 if quick else 10
    out: list[tuple[str, FaultScript, float]] = [
        ("kill-leader", kill_leader_repeatedly(rounds_kill, 3.0, 1.0), rounds_kill * 4.5 + 2),
        ("kill-follower", kill_follower(2.0, 5.0 * max(k, 0.5)), 10),
        ("kill-two", kill_two(2.0, 5.0), 10),
    ]
    for factor in (0.5, 2, 5, 20):
        pause = factor * ELECTION_MAX_S
        out.append((f"pause-leader-{factor}x", pause_leader(2.0, pause), 2.0 + pause + 4))
    out += [
        ("full-restart-together", full_restart(rounds_restart, 2.0, False), rounds_restart * 4.0),
        ("full-restart-staggered", full_restart(rounds_restart, 2.0, True), rounds_restart * 5.0),
        ("partition-leader", partition_leader(2.0, 5.0), 10),
        ("partition-follower", partition_follower(2.0, 5.0), 10),
        ("power-loss", power_loss(rounds_restart, 3.0), rounds_restart * 5.0),
        (
            "kill-leader-smtp-workers",
            kill_leader_repeatedly(rounds_kill, 3.0, 1.0),
            rounds_kill * 4.5 + 2,
        ),
        (
            "full-restart-together-smtp-workers",
            full_restart(rounds_restart, 2.0, False),
            rounds_restart * 4.0,
        ),
    ]
    return [(name, f, s, WORKERS if name.endswith("smtp-workers") else ()) for name, f, s in out]


def run(
    quick: bool,
    seed: int,
    only: str | None,
    progress: Callable[[str], None],
    size: int = 1024,
) -> list[Report]:
    reports: list[Report] = []
    for name, script, load_s, extra in scenarios(quick):
        if only and only not in name:
            continue
        progress(f"{name}: running ~{load_s:.0f}s of load")
        t0 = time.monotonic()
        with (
            tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp,
            Cluster(Path(tmp), extra_args=(*ARGS, *extra)) as cluster,
        ):
            report, result, ctx = run_scenario(
                name, cluster, script, seed, load_s=load_s, size=size
            )
        if name == "kill-two":
            bad = acked_in_window(result, ctx.marks["fault"] + 0.05, ctx.marks["heal"])
            report.no_majority_acks = len(bad)
            report.note = f"250 without a majority: {report.no_majority_acks}"
        if "term_before" in ctx.facts:
            report.note = f"leader term {ctx.facts['term_before']} -> {ctx.facts['term_after']}"
        reports.append(report)
        progress(
            f"{name}: {report.acknowledged}/{report.attempted} acked, lost {report.lost}, "
            f"dup {report.duplicated}, diverged {report.diverged} "
            f"({time.monotonic() - t0:.0f}s)"
        )
    return reports


def write_markdown(reports: list[Report], command: str, out: Path) -> None:
    lines = [
        "# Reliability: fault runs",
        "",
        "The promise under test: a message answered 250 is never lost while a majority",
        "survives, and no message is queued twice. Produced by:",
        "",
        f"    {command}",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| scenario | attempted | acked (250) | refused | lost | duplicated | diverged "
        "| failover s | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in reports:
        fo = "" if r.failover_s is None else f"{r.failover_s:.2f}"
        lines.append(
            f"| {r.scenario} | {r.attempted} | {r.acknowledged} | {r.refused} | {r.lost} "
            f"| {r.duplicated} | {r.diverged} | {fo} | {r.note} |"
        )
    lines += [
        "",
        "Rounds: kill-leader kills the leader 10 times (3 with --quick); full-restart-*",
        "kill -9 all three nodes and restart them 30 times each (3 with --quick); every",
        "scenario runs with log compaction every 150 entries, so restarts and catch-up",
        "cross snapshot + log. The checker reads every node's queue after recovery.",
        "The *-smtp-workers scenarios run every node with `smtp_workers = 2`: SMTP in",
        "worker processes that die with their node (they see their link close).",
        "power-loss kills all three as full-restart does (30 rounds, 3 with --quick), then",
        "does to each state dir what a kernel crash may do to commits never fsynced: the",
        "marker names another boot and 10 pages of data.mdb are garbled (W24).",
        "partition-follower cuts one follower off from both others for 5 s under load:",
        "with pre-vote (W25) it comes back without an election (the leader's term in notes).",
        "partition-* drop Raft traffic in the nodes' transport (the in-process hook); faults",
        "from the kernel between namespaced nodes are in the next section.",
        "",
        "`refused` counts every non-250 attempt (451 during elections or without a",
        "majority, and connection refusals while a node is down: the load generator",
        "does not retry, so refusals are expected). `failover s` is the gap from the",
        "last 250 before the first fault to the first 250 after it (0.0x when a 250",
        "for a message already in flight arrived just after the fault).",
        "",
    ]
    out.write_text("\n".join(lines + _history(out)))


def _history(out: Path) -> list[str]:
    """The section bench/netchaos.py writes in the same file (between its markers), kept
    below the new table; nothing else of the old file is (git keeps earlier results)."""
    from bench.netchaos import BEGIN, END

    try:
        text = out.read_text()
    except FileNotFoundError:
        return []
    if BEGIN not in text or END not in text:
        return []
    block = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return [*block.splitlines(), ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes)")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    ap.add_argument("--json", type=Path, help="also write the raw reports as JSON")
    ap.add_argument("--only", help="run only the scenarios whose name contains this")
    ap.add_argument(
        "--size",
        type=int,
        default=1024,
        help="message size in bytes (the load is text: from 32 KiB it is kept deflated)",
    )
    args = ap.parse_args(argv)
    command = "python -m bench.chaos" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    if args.only:
        command += f" --only {args.only}"
    if args.size != 1024:
        command += f" --size {args.size}"
    reports = run(
        args.quick,
        args.seed,
        args.only,
        lambda s: print(s, file=sys.stderr, flush=True),
        args.size,
    )
    write_markdown(reports, command, args.out)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in reports], indent=2))
    bad = [r for r in reports if not r.ok()]
    print(f"wrote {args.out}; {len(bad)} scenario(s) broke the promise", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
