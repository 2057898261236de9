"""Network-fault scenarios on namespaced nodes (netlab.py), with a safety and liveness checker.

A scenario = a 3-node `Cluster` whose nodes each live in their own network
namespace and deliver to a sink in their namespace, the async `LoadGen`
submitting to every node over the client links, a fault script acting on the
Raft links (link down, one- and two-way drops, loss, delay, kill -9) in a
thread, and a `/readyz` sampler. After the script's final heal the checker
keeps submitting one message to each node until each has answered 250, then
waits for the queue to drain, and reports:

    attempted, acknowledged, refused
    lost               acknowledged, never delivered and queued nowhere (must be 0)
    minority_acks      250s from a node cut off from every majority, for mail
                       submitted after the cut and answered before the heal (must be 0)
    duplicates         Message-IDs delivered more than once, and the most in one
                       leader change (bound: delivery_concurrency per change)
    resurrected        delivered, yet queued again at the end (must be 0)
    accept_after_heal  per node, seconds from the final heal to its first 250
                       (must exist for every node, within `ACCEPT_BOUND_S`)
    drained_s          seconds from the final heal until every acknowledged message
                       was delivered
    still_queued       acknowledged, not delivered, still queued at the end: a
                       liveness failure, reported apart from lost
    readyz             per node, 200s and 503s while faulted and after the heal, and
                       seconds from the heal to the first 200 with every node ready

Used by tests/fault/test_net_faults.py (short, seeded) and bench/chaos.py --net
(a long random schedule). Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.loadgen import LoadGen, LoadResult
from mqnode.devtools.devsink import read_sink

from .cluster import ADMIN_TOKEN, Cluster, http_request
from .netlab import NetLab

ACCEPT_BOUND_S = 15.0  # after the final heal, every node answers 250 within this
DRAIN_BOUND_S = 90.0
READY_BOUND_S = 30.0  # after the heal, every node's /readyz says 200 within this
READY_STREAK = 4  # ... and keeps saying it for this many polls in a row
READYZ_EVERY_S = 0.5
PROBE_EVERY_S = 0.25
DELIVERY_CONCURRENCY = 20  # the node's default: the most a leader change may duplicate


@dataclass
class NetContext:
    """What a fault script gets: the lab, the cluster, a seeded RNG, and marks."""

    lab: NetLab
    cluster: Cluster
    rng: random.Random
    marks: dict[str, float] = field(default_factory=dict)
    minority: set[int] = field(default_factory=set)  # nodes cut from every majority now
    minority_windows: list[tuple[int, float, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def cut_off(self, nodes: Sequence[int]) -> None:
        """Note that these nodes reach no majority from now until the next heal."""
        now = time.monotonic()
        for i in nodes:
            self.minority.add(i)
            self.minority_windows.append((i, now, float("inf")))

    def heal(self) -> None:
        """Lift every fault. A minority window closes when the heal *begins* (the first
        rule removed lets traffic through); the "heal" mark, from which liveness is
        measured, is set when it is complete."""
        began = time.monotonic()
        self.minority_windows = [(i, a, min(b, began)) for i, a, b in self.minority_windows]
        self.minority.clear()
        self.lab.heal()
        self.mark("heal")


NetScript = Callable[[NetContext], None]


@dataclass
class NetReport:
    scenario: str
    seed: int
    attempted: int = 0
    acknowledged: int = 0
    refused: int = 0
    lost: int = 0
    minority_acks: int = 0
    duplicates: int = 0
    leader_changes: int = 0
    resurrected: int = 0
    accept_after_heal_s: dict[str, float | None] = field(default_factory=dict)
    drained_s: float | None = None
    still_queued: int = 0
    readyz: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready_after_heal_s: float | None = None
    snapshot_installs: int = 0  # "installed snapshot" lines the nodes logged in the scenario
    details: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        if self.acknowledged == 0:
            out.append("nothing acknowledged")
        if self.lost:
            out.append(f"{self.lost} lost")
        if self.minority_acks:
            out.append(f"{self.minority_acks} acknowledged by a minority")
        if self.resurrected:
            out.append(f"{self.resurrected} resurrected")
        if self.duplicates > DELIVERY_CONCURRENCY * max(self.leader_changes, 1):
            out.append(f"{self.duplicates} duplicates for {self.leader_changes} leader changes")
        late = {
            n: s for n, s in self.accept_after_heal_s.items() if s is None or s > ACCEPT_BOUND_S
        }
        if late:
            out.append(f"nodes not accepting within {ACCEPT_BOUND_S:g} s of the heal: {late}")
        if self.still_queued:
            out.append(f"{self.still_queued} acknowledged still queued (not drained)")
        if self.ready_after_heal_s is None:
            out.append("not every node said ready after the heal")
        return out

    def ok(self) -> bool:
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReadyzSampler:
    """GET /readyz on every node every READYZ_EVERY_S in a thread: (time, node, status)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readyz", daemon=True)

    def __enter__(self) -> ReadyzSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(READYZ_EVERY_S):
            for node in self._cluster.nodes:
                status = _readyz(node.host, node.admin_port)
                self.samples.append((time.monotonic(), node.index, status))


def _readyz(host: str, port: int) -> int:
    try:
        status, _ = http_request(port, "GET", "/readyz", None, timeout_s=1.0, host=host)
        return status
    except OSError:
        return -1


def _submit_probe(host: str, port: int, seq: int, run_id: str) -> tuple[int, str, str]:
    """One message; (code, queue id or reply text, Message-ID)."""
    gen = LoadGen([(host, port)], concurrency=1, timeout_s=5.0, run_id=run_id)
    result = asyncio.run(gen.run(1, 10.0))
    a = result.attempts[0]
    return a.code, a.queue_id or a.text, a.message_id


def run_net_scenario(
    name: str,
    lab: NetLab,
    cluster: Cluster,
    script: NetScript,
    seed: int,
    load_s: float,
    concurrency: int = 8,
) -> NetReport:
    ctx = NetContext(lab, cluster, random.Random(seed))
    report = NetReport(name, seed)
    installs_before = _snapshot_installs(cluster)
    first_term = int(cluster.status(cluster.wait_for_leader(30))["term"])
    targets = [(n.host, n.smtp_port) for n in cluster.nodes]
    gen = LoadGen(targets, concurrency=concurrency, timeout_s=10.0, run_id=f"{name}-{seed}")

    async def drive() -> LoadResult:
        load = asyncio.create_task(gen.run(1_000_000, load_s))
        try:
            await asyncio.to_thread(script, ctx)
        finally:
            result = await load
        return result

    with ReadyzSampler(cluster) as sampler:
        try:
            result = asyncio.run(drive())
        finally:
            if ctx.minority or "heal" not in ctx.marks:
                ctx.heal()
        for node in cluster.nodes:
            if not node.running:
                cluster.start_node(node.index)
        heal = ctx.marks["heal"]
        for node in cluster.nodes:  # the load's own 250s after the heal count first
            mine = [a for a in result.attempts if a.target == node.smtp_addr]
            firsts = [a.end_s for a in mine if a.code == 250 and a.end_s > heal]
            if firsts:
                report.accept_after_heal_s[node.node_id] = round(min(firsts) - heal, 2)
        probe_acks = _accept_after_heal(cluster, heal, report, f"{name}-{seed}-after")
        acked = {**result.acked, **probe_acks}
        _settle(report, cluster, lab, acked, heal)
        _wait_all_ready(cluster, heal + READY_BOUND_S, report)
        _readyz_summary(report, sampler.samples, ctx, heal, cluster)
    report.attempted = len(result.attempts) + len(probe_acks)
    report.acknowledged = len(acked)
    report.refused = len(result.attempts) - len(result.acked)
    report.minority_acks = sum(
        1
        for a in result.attempts
        if a.code == 250
        and any(
            a.target == cluster.nodes[i].smtp_addr and start < a.start_s and a.end_s < end
            for i, start, end in ctx.minority_windows
        )
    )
    last_term = int(cluster.status(cluster.wait_for_leader(30))["term"])
    report.leader_changes = last_term - first_term
    report.snapshot_installs = _snapshot_installs(cluster) - installs_before
    return report


def _snapshot_installs(cluster: Cluster) -> int:
    total = 0
    for node in cluster.nodes:
        try:
            total += node.log_path.read_text(errors="replace").count("installed snapshot at")
        except FileNotFoundError:
            pass
    return total


def _accept_after_heal(
    cluster: Cluster, heal: float, report: NetReport, run_id: str
) -> dict[str, str]:
    """Submit to each node until it answers 250 (bounded): seconds from the heal to it."""
    acked: dict[str, str] = {}
    pending = {n.index for n in cluster.nodes if n.node_id not in report.accept_after_heal_s}
    seq = 0
    deadline = heal + max(ACCEPT_BOUND_S * 2, 30.0)
    while pending and time.monotonic() < deadline:
        for i in sorted(pending):
            node = cluster.nodes[i]
            seq += 1
            code, qid, mid = _submit_probe(node.host, node.smtp_port, seq, f"{run_id}-{i}-{seq}")
            if code == 250:
                acked[mid] = qid
                report.accept_after_heal_s[node.node_id] = round(time.monotonic() - heal, 2)
                pending.discard(i)
        if pending:
            time.sleep(PROBE_EVERY_S)
    for i in pending:
        report.accept_after_heal_s[cluster.nodes[i].node_id] = None
    return acked


def _wait_all_ready(cluster: Cluster, deadline: float, report: NetReport) -> None:
    """Poll until every node's /readyz has said 200 in READY_STREAK polls in a row (the
    sampler records them too), or say why not."""
    why: dict[str, str] = {}
    streak = 0
    while time.monotonic() < deadline and streak < READY_STREAK:
        why = {}
        for node in cluster.nodes:
            try:
                status, body = http_request(
                    node.admin_port, "GET", "/readyz", None, timeout_s=1.0, host=node.host
                )
            except OSError as exc:
                status, body = -1, str(exc).encode()
            if status != 200:
                why[node.node_id] = body.decode(errors="replace")[:300]
        streak = 0 if why else streak + 1
        time.sleep(READYZ_EVERY_S)
    if streak < READY_STREAK:
        report.details += [f"not ready: {n}: {w}" for n, w in why.items()]


def _delivered(lab: NetLab) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(lab.n):
        path = lab.sink_file(i)
        if path.exists():
            seen.update(str(r.get("message_id")) for r in read_sink(path))
    return seen


def _queued(cluster: Cluster) -> dict[str, set[str]]:
    """Message-ID -> the nodes that still queue it."""
    out: dict[str, set[str]] = defaultdict(set)
    for i in cluster.live_indexes():
        for m in cluster.queue_messages(i):
            out[str(m.get("message_id"))].add(cluster.nodes[i].node_id)
    return out


def _settle(
    report: NetReport, cluster: Cluster, lab: NetLab, acked: dict[str, str], heal: float
) -> None:
    deadline = heal + DRAIN_BOUND_S
    delivered = _delivered(lab)
    while time.monotonic() < deadline:
        delivered = _delivered(lab)
        if all(mid in delivered for mid in acked):
            report.drained_s = round(time.monotonic() - heal, 2)
            break
        time.sleep(0.5)
    cluster.wait_applied_equal(30)
    queued = _queued(cluster)
    missing = [mid for mid in acked if mid not in delivered]
    report.lost = sum(1 for mid in missing if mid not in queued)
    report.still_queued = sum(1 for mid in missing if mid in queued)
    report.duplicates = sum(c - 1 for mid, c in delivered.items() if c > 1 and mid in acked)
    report.resurrected = sum(1 for mid in delivered if mid in queued)
    report.details += [f"lost {mid}" for mid in missing if mid not in queued][:10]
    report.details += [f"still queued {mid} on {sorted(queued[mid])}" for mid in missing
                       if mid in queued][:10]  # fmt: skip


def _readyz_summary(
    report: NetReport,
    samples: list[tuple[float, int, int]],
    ctx: NetContext,
    heal: float,
    cluster: Cluster,
) -> None:
    fault = ctx.marks.get("fault", heal)
    for node in cluster.nodes:
        mine = [(t, s) for t, i, s in samples if i == node.index]
        during = Counter(str(s) for t, s in mine if fault <= t < heal)
        after = Counter(str(s) for t, s in mine if t >= heal)
        report.readyz[node.node_id] = {"during": dict(during), "after": dict(after)}
    # Per node: the first sample after the heal from which on it said 200 every time.
    ready_at: list[float] = []
    for node in cluster.nodes:
        after = [(t, code) for t, i, code in samples if i == node.index and t >= heal]
        since: float | None = None
        for t, code in after:
            if code != 200:
                since = None
            elif since is None:
                since = t
        if since is None:
            return  # this node never settled on 200: ready_after_heal_s stays None
        ready_at.append(since)
    report.ready_after_heal_s = round(max(max(ready_at) - heal, 0.0), 2)


# --- fault scripts --------------------------------------------------------------------------


def _fault(after_s: float, hold_s: float, act: Callable[[NetContext, int], None]) -> NetScript:
    """Wait `after_s`, apply `act(ctx, leader index)` (marked "fault"), hold, heal."""

    def script(ctx: NetContext) -> None:
        ctx.sleep(after_s)
        lead = ctx.cluster.wait_for_leader(20)
        ctx.mark("fault")
        act(ctx, lead)
        ctx.sleep(hold_s)
        ctx.heal()

    return script


def _a_follower(ctx: NetContext, lead: int) -> int:
    return ctx.rng.choice([i for i in range(len(ctx.cluster.nodes)) if i != lead])


def isolate_leader(after_s: float, isolated_s: float) -> NetScript:
    def act(ctx: NetContext, lead: int) -> None:
        ctx.lab.isolate(lead)
        ctx.cut_off([lead])

    return _fault(after_s, isolated_s, act)


def cut_follower_from_leader(after_s: float, cut_s: float) -> NetScript:
    """Two-way cut between the leader and one follower; the other follower sees both."""
    return _fault(after_s, cut_s, lambda ctx, lead: ctx.lab.cut(lead, _a_follower(ctx, lead)))


def cut_followers_from_each_other(after_s: float, cut_s: float) -> NetScript:
    def act(ctx: NetContext, lead: int) -> None:
        a, b = [i for i in range(len(ctx.cluster.nodes)) if i != lead]
        ctx.lab.cut(a, b)

    return _fault(after_s, cut_s, act)


def one_way(after_s: float, cut_s: float, from_leader: bool) -> NetScript:
    """Packets one way only between the leader and a follower (leader->follower or back)."""

    def act(ctx: NetContext, lead: int) -> None:
        follower = _a_follower(ctx, lead)
        if from_leader:
            ctx.lab.drop(lead, follower)
        else:
            ctx.lab.drop(follower, lead)

    return _fault(after_s, cut_s, act)


def flapping(after_s: float, total_s: float, up_s: tuple[float, float] = (0.5, 3.0),
             down_s: tuple[float, float] = (0.3, 2.5)) -> NetScript:  # fmt: skip
    """Random Raft links go down and up for total_s (seeded)."""

    def script(ctx: NetContext) -> None:
        ctx.sleep(after_s)
        ctx.mark("fault")
        end = time.monotonic() + total_s
        while time.monotonic() < end:
            victim = ctx.rng.randrange(ctx.lab.n)
            ctx.lab.link_down(victim)
            ctx.sleep(ctx.rng.uniform(*down_s))
            ctx.lab.link_up(victim)
            ctx.sleep(ctx.rng.uniform(*up_s))
        ctx.heal()

    return script


def lossy_slow(after_s: float, total_s: float, rtt_ms: float, loss: float) -> NetScript:
    """Every Raft link: rtt_ms round trip (+-20% jitter) and `loss` packet loss each way."""

    def script(ctx: NetContext) -> None:
        ctx.sleep(after_s)
        ctx.mark("fault")
        for i in range(ctx.lab.n):
            ctx.lab.delay(i, rtt_ms / 2, rtt_ms / 10, seed=ctx.rng.randrange(2**31))
            ctx.lab.loss(i, loss)
        ctx.sleep(total_s)
        ctx.heal()

    return script


def kill_during_heal(after_s: float, isolated_s: float) -> NetScript:
    """Isolate the leader; at the heal, kill -9 it and start it again at once."""

    def script(ctx: NetContext) -> None:
        ctx.sleep(after_s)
        lead = ctx.cluster.wait_for_leader(20)
        ctx.mark("fault")
        ctx.lab.isolate(lead)
        ctx.cut_off([lead])
        ctx.sleep(isolated_s)
        ctx.heal()
        ctx.sleep(ctx.rng.uniform(0.0, 0.5))
        ctx.cluster.kill(lead)
        ctx.cluster.start_node(lead)

    return script


def partition_during_transfer(after_s: float, cut_s: float) -> NetScript:
    """Ask for a leadership transfer and cut the target from the leader right away."""

    def act(ctx: NetContext, lead: int) -> None:
        target = _a_follower(ctx, lead)
        _post(
            ctx.cluster,
            lead,
            "/raft/transfer-leadership",
            {"to": ctx.cluster.nodes[target].raft_addr},
        )
        ctx.lab.cut(lead, target)

    return _fault(after_s, cut_s, act)


def _post(c: Cluster, i: int, path: str, body: dict[str, Any]) -> None:
    """POST to node i's admin endpoint; an error answer is the scenario's to judge."""
    node = c.nodes[i]
    auth = f"Bearer {ADMIN_TOKEN}"
    data = json.dumps(body).encode()
    http_request(node.admin_port, "POST", path, auth, data, timeout_s=5.0, host=node.host)


def cut_during_catch_up(after_s: float, away_s: float, again_s: float) -> NetScript:
    """Isolate a follower long enough to need a snapshot; cut it again while it catches up."""

    def script(ctx: NetContext) -> None:
        ctx.sleep(after_s)
        lead = ctx.cluster.wait_for_leader(20)
        follower = _a_follower(ctx, lead)
        ctx.mark("fault")
        ctx.lab.isolate(follower)
        ctx.sleep(away_s)
        ctx.lab.heal()
        ctx.sleep(ctx.rng.uniform(0.1, 0.5))
        ctx.lab.isolate(follower)
        ctx.sleep(again_s)
        ctx.heal()

    return script


def cut_during_membership_change(after_s: float, cut_s: float) -> NetScript:
    """Start a fourth node, ask the leader to add it, and cut the leader from a follower
    while the change commits. The lab needs a fourth host."""

    def script(ctx: NetContext) -> None:
        c = ctx.cluster
        ctx.sleep(after_s)
        lead = c.wait_for_leader(20)
        follower = _a_follower(ctx, lead)
        new = c.add_node()
        c.start_node(new)
        ctx.mark("fault")
        adding = threading.Thread(
            target=_post,
            args=(c, lead, "/raft/add-node", {"addr": c.nodes[new].raft_addr, "timeout_s": 10}),
            daemon=True,
        )
        adding.start()
        ctx.sleep(0.05)
        ctx.lab.cut(lead, follower)
        ctx.sleep(cut_s)
        ctx.heal()
        adding.join(timeout=20)

    return script
