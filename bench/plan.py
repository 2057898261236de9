"""What every workload shares: the plans (quick, full), results, and clusters that clean up."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.runners import HOST, Row
from tests.support.cluster import Cluster

KIB = 1024
MIB = 1024 * 1024
PROD_TUNING: tuple[str, ...] = ()  # production defaults
# SMTP sessions in two worker processes per node (smtp_workers; default 0 = in the node)
WORKERS: tuple[str, ...] = ("--smtp-workers", "2")
OURS = "ours"  # bench/loadgen.py: asyncio + aiosmtplib, records every reply
SMTP_SOURCE = "smtp-source"  # Postfix's load generator

Step = Callable[[str], None]  # progress: called with what is being measured next


@dataclass
class Plan:
    mode: str
    messages: int  # per row at 1 KiB; bigger messages get fewer (bytes_per_row)
    sessions: int
    sizes: list[int]
    recipients: list[int]
    latency_s: float
    failover_rounds: int
    scaling_sizes: list[int]
    node_counts: list[int]
    bytes_per_row: int
    session_counts: list[int] = field(default_factory=lambda: [10, 40])
    max_s: float = 90.0
    paired_rounds: int = 2
    shaping_backlog: int = 0  # the shaping workload's backlog; 0: its default for the mode
    baseline: Baseline | None = None  # an older mqnode measured in the same rounds

    def count_for(self, size: int) -> int:
        return max(20, min(self.messages, self.bytes_per_row // max(size, 1)))


QUICK = Plan("quick", 1000, 20, [KIB], [1], 5.0, 1, [KIB, 100 * KIB, MIB], [5], 30 * MIB)
FULL = Plan(
    "full",
    5000,
    20,
    [KIB, 10 * KIB, 100 * KIB],
    [1, 10],
    20.0,
    5,
    [KIB, 10 * KIB, 100 * KIB, MIB, 5 * MIB],
    [5],
    400 * MIB,
    [5, 10, 20, 40, 80],
    paired_rounds=7,
)


@dataclass(frozen=True)
class Baseline:
    """An older mqnode checkout (`--baseline-tree`) that the paired workloads measure in
    the same rounds as this one: a ratio to it is a regression check that does not move
    with the machine's hour, as a ratio to Postfix does."""

    tree: Path
    commit: str  # short, for the rows' names
    negated_flags: bool  # its CLI takes --no-delivery-enabled (older ones: "... 0")

    @classmethod
    def at(cls, tree: Path) -> Baseline:
        if not (tree / "mqnode" / "__init__.py").is_file():
            raise SystemExit(f"--baseline-tree {tree}: no mqnode checkout there")
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        usage = subprocess.run(
            [sys.executable, "-m", "mqnode.cli", "run", "--help"],
            capture_output=True,
            text=True,
            check=False,
            cwd=tree,
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        )
        if usage.returncode != 0:
            raise SystemExit(f"--baseline-tree {tree}: its CLI fails: {usage.stderr[-300:]}")
        return cls(tree, commit or tree.name, "--no-delivery-enabled" in usage.stdout)


class BaselineCluster(Cluster):
    """A Cluster whose nodes (and their SMTP workers) run the code at a Baseline's tree."""

    def __init__(self, base_dir: Path, baseline: Baseline, **kwargs: Any) -> None:
        self.baseline = baseline
        super().__init__(base_dir, **kwargs)

    def command(self, i: int) -> list[str]:
        cmd = super().command(i)
        if not self.baseline.negated_flags and "--no-delivery-enabled" in cmd:
            at = cmd.index("--no-delivery-enabled")
            cmd[at : at + 1] = ["--delivery-enabled", "0"]
        return ["env", f"PYTHONPATH={self.baseline.tree}", *cmd]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    # Raw series for the plots: failover throughput over time, latency samples.
    series: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def bench_cluster(
    base: Path,
    n: int,
    relay: str | None = None,
    extra: tuple[str, ...] = (),
    baseline: Baseline | None = None,
) -> Iterator[Cluster]:
    """A started cluster whose data dirs are deleted once its rows are measured: a full
    run writes tens of GB (100 KiB x 10 recipients x 4096 per row), too much to keep.

    Started means every node's SMTP workers accept, as Postfix is measured from its
    banner: six workers importing for ~0.5 s after a start took a core-second from a
    run measured at once (a tenth of a 100 KiB row, a quarter of a 5 MiB one).
    With `baseline`, the nodes run that older checkout's code."""
    args: dict[str, Any] = {
        "n": n,
        "extra_args": (*PROD_TUNING, *extra),
        "relay_host": relay,
        "start_timeout_s": 60,
    }
    try:
        with (
            Cluster(base, **args) if baseline is None else BaselineCluster(base, baseline, **args)
        ) as c:
            c.wait_smtp_workers_up(c.start_timeout_s)
            yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def targets(c: Cluster, indexes: list[int]) -> list[tuple[str, int]]:
    return [(HOST, c.nodes[i].smtp_port) for i in indexes]
