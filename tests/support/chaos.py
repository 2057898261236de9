"""Fault scenarios under load, and the checker that joins acks with queue contents.

A scenario = a 3-node `Cluster`, the async `LoadGen` submitting to every node,
and a fault script run in a thread alongside (kill -9, SIGSTOP, partition,
full restart...). When load and fault are done, every node is brought back,
the cluster converges, and the checker reports per scenario:

    attempted, acknowledged (250), refused (4xx/5xx/connection),
    lost        acknowledged but not queued on some node (must be 0),
    duplicated  Message-IDs with more than one queue entry on some node (must be 0),
    diverged    nodes whose queue differs from the others' (must be 0),
    failover_s  last 250 before the fault to the first 250 after it.

Used by tests/fault (short, seeded) and bench/chaos.py (long).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LoadGen, LoadResult
from mqnode.spool.store import UNSYNCED_MARKER

from .cluster import ADMIN_TOKEN, Cluster

FIRST_250_WAIT_S = 30.0  # run_scenario: how long a fault waits for the load's first 250

FaultScript = Callable[["FaultContext"], None]


@dataclass
class FaultContext:
    """What a fault script gets: the cluster, a seeded RNG, and marks to record times."""

    cluster: Cluster
    rng: random.Random
    marks: dict[str, float] = field(default_factory=dict)
    facts: dict[str, int] = field(default_factory=dict)  # what a script saw (Raft terms)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class Report:
    scenario: str
    attempted: int
    acknowledged: int
    refused: int
    lost: int
    duplicated: int
    diverged: int
    failover_s: float | None
    details: list[str] = field(default_factory=list)
    no_majority_acks: int = 0  # 250s given while no majority could exist (kill-two)
    note: str = ""  # for the table's notes column

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.diverged == 0
            and self.no_majority_acks == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_scenario(
    name: str,
    cluster: Cluster,
    fault: FaultScript,
    seed: int,
    load_s: float,
    max_messages: int = 100_000,
    concurrency: int = 10,
    size: int = 1024,
) -> tuple[Report, LoadResult, FaultContext]:
    ctx = FaultContext(cluster, random.Random(seed))
    targets = [("127.0.0.1", n.smtp_port) for n in cluster.nodes]
    gen = LoadGen(
        targets, concurrency=concurrency, size=size, timeout_s=10.0, run_id=f"{name}-{seed}"
    )

    async def drive() -> LoadResult:
        load = asyncio.create_task(gen.run(max_messages, load_s))
        try:
            await _first_250(gen, load, FIRST_250_WAIT_S)
            await asyncio.to_thread(fault, ctx)
        finally:
            result = await load
        return result

    result = asyncio.run(drive())
    for node in cluster.nodes:
        if node.paused:
            cluster.resume(node.index)
    for node in cluster.nodes:
        if not node.running:
            cluster.start_node(node.index)
    cluster.wait_for_leader(30)
    cluster.wait_applied_equal(60)
    fault_at = ctx.marks.get("fault")
    report = check(name, cluster, result, fault_at)
    return report, result, ctx


async def _first_250(gen: LoadGen, load: asyncio.Task[LoadResult], wait_s: float) -> None:
    """Hold the fault until the load has had a 250 (or ended, or `wait_s` passed): on a
    busy machine a cluster with SMTP workers can take seconds to answer its first
    message, and a fault before that leaves no failover to measure."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not load.done():
        if any(a.code == 250 for a in gen.result.attempts):
            return
        await asyncio.sleep(0.05)


def check(name: str, cluster: Cluster, result: LoadResult, fault_at: float | None) -> Report:
    acked = result.acked
    details: list[str] = []
    lost: set[str] = set()
    dup: set[str] = set()
    views: list[frozenset[tuple[str, str]]] = []
    for i in cluster.live_indexes():
        msgs = cluster.queue_messages(i)
        counts = Counter(str(m["message_id"]) for m in msgs)
        ids = {str(m["message_id"]): str(m["id"]) for m in msgs}
        views.append(frozenset((m["message_id"], m["id"]) for m in msgs))
        for mid, qid in acked.items():
            if mid not in ids:
                lost.add(mid)
                details.append(f"{cluster.nodes[i].node_id}: acked {mid} ({qid}) not queued")
            elif ids[mid] != qid:
                details.append(
                    f"{cluster.nodes[i].node_id}: {mid} acked as {qid}, queued {ids[mid]}"
                )
        dup.update(mid for mid, c in counts.items() if c > 1)
    diverged = sum(1 for v in views if v != views[0]) if views else 0
    refused = len(result.attempts) - len(acked)
    gap = result.failover_gap_s(fault_at) if fault_at is not None else None
    return Report(
        scenario=name,
        attempted=len(result.attempts),
        acknowledged=len(acked),
        refused=refused,
        lost=len(lost),
        duplicated=len(dup),
        diverged=diverged,
        failover_s=None if gap is None else round(gap, 3),
        details=details[:20],
    )


def post_json(cluster: Cluster, i: int, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        cluster.nodes[i].admin_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


# --- fault scripts -------------------------------------------------------------------


def kill_leader_repeatedly(rounds: int, every_s: float, down_s: float) -> FaultScript:
    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        for r in range(rounds):
            ctx.sleep(every_s)
            lead = c.wait_for_leader(20)
            if r == 0:
                ctx.mark("fault")
            c.kill(lead)
            ctx.sleep(down_s)
            c.start_node(lead)

    return script


def kill_follower(after_s: float, down_s: float) -> FaultScript:
    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        victim = ctx.rng.choice(c.followers())
        ctx.mark("fault")
        c.kill(victim)
        ctx.sleep(down_s)
        c.start_node(victim)

    return script


def kill_two(after_s: float, down_s: float) -> FaultScript:
    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        lead = c.wait_for_leader(20)
        other = ctx.rng.choice([i for i in range(len(c.nodes)) if i != lead])
        c.kill(lead)
        c.kill(other)
        ctx.mark("fault")
        ctx.sleep(down_s)
        ctx.mark("heal")
        c.start_node(lead)
        c.start_node(other)

    return script


def pause_leader(after_s: float, pause_s: float) -> FaultScript:
    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        lead = c.wait_for_leader(20)
        ctx.mark("fault")
        c.pause(lead)
        ctx.sleep(pause_s)
        c.resume(lead)

    return script


def full_restart(
    rounds: int, every_s: float, staggered: bool, power_loss: bool = False
) -> FaultScript:
    """kill -9 every node and start them again; with `power_loss`, in between, do to
    each data dir what a kernel crash may do (`tear_unsynced_state`)."""

    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        for r in range(rounds):
            ctx.sleep(every_s)
            if r == 0:
                ctx.mark("fault")
            for node in c.nodes:
                c.kill(node.index)
            if power_loss:
                for node in c.nodes:
                    tear_unsynced_state(node.data_dir / "state", ctx.rng)
            order = list(range(len(c.nodes)))
            ctx.rng.shuffle(order)
            for i in order:
                c.spawn(i)
                if staggered:
                    ctx.sleep(ctx.rng.uniform(0.1, 1.0))
            c.wait_admin_up(order, 30)
            c.wait_for_leader(30)

    return script


def power_loss(rounds: int, every_s: float) -> FaultScript:
    """The whole cluster loses power: kill -9 every node; the marker of each state
    that skipped fsyncs (spool/store.py) names a boot that is gone, and pages of its data
    file are torn. Journals and snapshots, always fsynced, are left as they are."""
    return full_restart(rounds, every_s, staggered=False, power_loss=True)


def tear_unsynced_state(state_dir: Path, rng: random.Random, pages: int = 8) -> bool:
    """Make `state_dir` look as after a kernel crash: another boot's marker, and
    `pages` random 4 KiB pages of its data file (meta pages included) garbled.
    False when its commits were synced (no marker): a crash loses nothing there."""
    marker = state_dir / UNSYNCED_MARKER
    if not marker.exists():
        return False
    marker.write_text("00000000-0000-4000-8000-crashedboot0\n", encoding="ascii")
    data = state_dir / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as fh:
        for page in [0, 1, *(rng.randrange(size // 4096) for _ in range(pages))]:
            fh.seek(page * 4096)
            fh.write(rng.randbytes(4096))
    return True


def partition_leader(after_s: float, isolated_s: float) -> FaultScript:
    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        lead = c.wait_for_leader(20)
        others = [n for n in c.nodes if n.index != lead]
        ctx.mark("fault")
        post_json(c, lead, "/fault/partition", {"block": [n.raft_addr for n in others]})
        for n in others:
            post_json(c, n.index, "/fault/partition", {"block": [c.nodes[lead].raft_addr]})
        ctx.sleep(isolated_s)
        for n in c.nodes:
            post_json(c, n.index, "/fault/partition", {"block": []})
        ctx.mark("heal")

    return script


def partition_follower(after_s: float, isolated_s: float) -> FaultScript:
    """Cut one follower off from both others, then heal. With pre-vote (W25) the leader
    keeps its term throughout: `facts` holds the term before the cut and after the heal."""

    def script(ctx: FaultContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        lead = c.wait_for_leader(20)
        ctx.facts["term_before"] = int(c.status(lead)["term"])
        cut = next(n for n in c.nodes if n.index != lead)
        others = [n for n in c.nodes if n is not cut]
        ctx.mark("fault")
        post_json(c, cut.index, "/fault/partition", {"block": [n.raft_addr for n in others]})
        for n in others:
            post_json(c, n.index, "/fault/partition", {"block": [cut.raft_addr]})
        ctx.sleep(isolated_s)
        for n in c.nodes:
            post_json(c, n.index, "/fault/partition", {"block": []})
        ctx.mark("heal")
        ctx.sleep(1.0)  # a disruptive rejoin would have forced its election by now
        ctx.facts["term_after"] = int(c.status(c.wait_for_leader(20))["term"])

    return script


def acked_in_window(result: LoadResult, start_s: float, end_s: float) -> list[str]:
    """Message-IDs answered 250 although submitted after start_s and answered before end_s."""
    return [
        a.message_id
        for a in result.attempts
        if a.code == 250 and a.start_s >= start_s and a.end_s <= end_s
    ]
