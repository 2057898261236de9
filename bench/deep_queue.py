"""deep: a million deferred messages for a dead destination slow nothing else down.

Operators of other MTAs report memory blow-ups and slowdowns with big queues.
This workload queues `DEEP` 1 KiB messages (full mode: 1,000,000) for a
destination that refuses connections (`dead.bench.test`, whose MX address
listens on nothing), deferred once and retried within `SPREAD_S` (Postfix's
maximal_backoff_time: a queue that has been deferred a while retries each
message about once an hour, ~250 a second here, all of which the dispatcher
attempts and defers again while fresh mail is measured). The queue is built
by bench/deep_state.py (the product's state machine, then `mqnode restore`,
then `cluster add-node` twice), not through a million SMTP sessions.

Rows, each against the same measured on an empty 3-node cluster in the same
run (2 SMTP workers, MX delivery through a real DNS server on loopback):

  fresh mail accepted   smtp-source, 1 KiB, `plan.sessions` sessions, to a live
                        domain: msg/s answered 250
  fresh mail delivered  the same messages: msg/s until the live sink has all
  RSS                   each node process's resident memory after that, and its
                        anonymous part (the heap: the LMDB map is file-backed and
                        the kernel reclaims it under pressure)
  start, catch-up       `mqnode restore` and the restored node's start; each added
                        follower's time from `cluster add-node` to having applied
                        the leader's index (the state comes as a snapshot)
  snapshot              a compaction of the leader asked for through the admin
                        endpoint, until its snapshot.bin covers the applied index
  queue list            `mqnode queue list` (first page, 1000 messages), and
                        `--sender` matching nothing (every message read)
  queue delete          `mqnode queue delete --domain dead.bench.test`: until it
                        returns, and until every node's queue has none left

Bounded: every wait has a deadline; clusters, sinks and the DNS server are
stopped and their data removed. Full mode needs about 16 GB of free disk (three
data dirs of 5 GB: state, snapshot) and takes about ten minutes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import postfix
from bench.deep_state import build_snapshot
from bench.plan import KIB, SMTP_SOURCE, WORKERS, Plan, Results, Step
from bench.runners import Row
from mqnode.raft import snapshot_file
from tests.support.chaos import post_json
from tests.support.cli import run_cli
from tests.support.cluster import Cluster, http_get
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import Sink, SinkHost, arrival_times, bind_common_port

DEEP = {"full": 1_000_000, "quick": 20_000}
SPREAD_S = 4000.0
DEAD = "dead.bench.test"
LIVE = "live.bench.test"
HOSTS = {"live": "127.0.0.44", "dead": "127.0.0.45"}  # nothing listens on the dead one
WORKLOAD = "deep"
CLI_S = 600.0  # a CLI call's deadline
STEADY_WINDOW_S = 5.0
STEADY_MAX_S = 300.0


def deep(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    queued = DEEP.get(plan.mode, DEEP["quick"])
    fresh = plan.messages
    params: dict[str, Any] = {"size": KIB, "sessions": plan.sessions, "messages": fresh}
    params["generator"] = SMTP_SOURCE
    why = postfix.available(instance=False)
    if why is not None:
        out.rows.append(Row(WORKLOAD, "deep queue", dict(params), note=f"skipped: {why}"))
        return
    port, socks = bind_common_port([HOSTS["live"]])
    zones = {
        LIVE: {"MX": [[10, f"mx.{LIVE}"]]},
        f"mx.{LIVE}": {"A": [HOSTS["live"]]},
        DEAD: {"MX": [[10, f"mx.{DEAD}"]]},
        f"mx.{DEAD}": {"A": [HOSTS["dead"]]},
    }
    lifetime_s = 3600.0 + queued / 500
    rows: list[Row] = []
    try:
        with (
            DnsServer(zones, max_lifetime_s=lifetime_s) as dns,
            SinkHost(max_lifetime_s=lifetime_s) as host,
        ):
            sink = host.add("live", socks[HOSTS["live"]])
            args = (*WORKERS, "--delivery-port", str(port))
            dns_addr = f"{dns.host}:{dns.port}"
            step(f"deep: building a state of {queued:,} deferred messages")
            seed = _seed(tmp / "seed")
            built = build_snapshot(
                seed, tmp / "deep.bin", tmp / "build", queued, f"u@{DEAD}", SPREAD_S
            )
            shutil.rmtree(tmp / "build", ignore_errors=True)
            step("deep: fresh mail, empty queue")
            with Cluster(tmp / "empty", 3, args, dns_server=dns_addr, start_timeout_s=60) as c:
                empty = _fresh(c, sink, fresh, plan)
                empty_rss = _rss(c)
            shutil.rmtree(tmp / "empty", ignore_errors=True)
            step(f"deep: fresh mail, {queued:,} deferred")
            deep_rows = _deep(tmp, args, dns_addr, sink, fresh, plan, queued, step)
    finally:
        for d in ("seed", "empty", "deep", "build"):
            shutil.rmtree(tmp / d, ignore_errors=True)
        (tmp / "deep.bin").unlink(missing_ok=True)
    label = f"{queued:,} deferred"
    build_note = (
        f"state built in {built.seconds:.0f} s ({built.messages / built.seconds:,.0f} msg/s), "
        f"snapshot {built.snapshot_bytes / 2**20:,.0f} MiB"
    )
    (acc, e2e), deep_rss = deep_rows.pop("fresh"), deep_rows.pop("rss")
    steady = deep_rows.pop("steady")
    for name, empty_v, deep_v in (("accepted", empty[0], acc), ("delivered", empty[1], e2e)):
        rows.append(Row(WORKLOAD, f"fresh mail {name}, empty queue", dict(params), rate=empty_v))
        r = Row(WORKLOAD, f"fresh mail {name}, {label}", dict(params), rate=deep_v)
        r.note = f"x empty queue {deep_v / empty_v:.2f}" if empty_v else ""
        r.note += f"; measured once the dead mail due meanwhile was deferred ({steady})"
        rows.append(r)
    for r in rows:
        r.acked = r.attempted = fresh
    info = {"messages": queued, "generator": "-"}  # rows that are no load's rate
    for name, rss in (("empty queue", empty_rss), (label, deep_rss)):
        rows.append(Row(WORKLOAD, f"RSS per node, {name}", dict(info), note=rss))
    for name, note in deep_rows.items():
        rows.append(Row(WORKLOAD, name, dict(info), note=note))
    built_row = Row(WORKLOAD, "the deep state (bench/deep_state.py)", dict(info))
    built_row.note = build_note
    rows.append(built_row)
    out.rows += rows


def _deep(
    tmp: Path,
    args: tuple[str, ...],
    dns_addr: str,
    sink: Sink,
    fresh: int,
    plan: Plan,
    queued: int,
    step: Step,
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    c = Cluster(tmp / "deep", 1, args, dns_server=dns_addr, start_timeout_s=600)
    try:
        t0 = time.monotonic()
        proc = run_cli(
            "restore", "--snapshot", str(tmp / "deep.bin"), *c.command(0)[4:], timeout_s=CLI_S
        )
        if proc.returncode != 0:
            raise postfix.PostfixBenchError(f"restore failed: {proc.stderr.strip()}")
        restored = time.monotonic() - t0
        (tmp / "deep.bin").unlink(missing_ok=True)
        t0 = time.monotonic()
        c.start()
        started = time.monotonic() - t0
        found["restore and start"] = f"restore {restored:.1f} s, start to leader {started:.1f} s"
        catchup = []
        for _ in range(2):
            step("deep: a follower added, catching up")
            catchup.append(_add_follower(c))
        found["follower catch-up"] = ", ".join(f"{s:.1f} s" for s in catchup) + (
            " from `cluster add-node` to the leader's applied index (snapshot install)"
        )
        step("deep: the backlog due meanwhile deferred")
        found["steady"] = _steady(c, queued / SPREAD_S)
        found["fresh"] = _fresh(c, sink, fresh, plan)
        found["rss"] = _rss(c)
        lead = c.leader()
        step("deep: compaction, queue list, queue delete")
        found["snapshot of the leader"] = f"{_compact(c, lead):.1f} s"
        admin = ["--admin", c.nodes[lead].admin_addr, "--admin-token-file", str(c.admin_token_file)]
        t0 = time.monotonic()
        listed = run_cli("queue", "list", *admin, timeout_s=CLI_S)
        found["queue list, first page"] = (
            f"{time.monotonic() - t0:.2f} s (the command, Python's start included); "
            f"{listed.stdout.strip().splitlines()[-1] if listed.stdout.strip() else listed.stderr}"
        )
        t0 = time.monotonic()
        who = ("--sender", "nobody@nowhere.bench.test")
        none = run_cli("queue", "list", *who, *admin, timeout_s=CLI_S)
        found["queue list --sender (no match: every message read)"] = (
            f"{time.monotonic() - t0:.1f} s; {(none.stdout or none.stderr).strip()[-60:]}"
        )
        t0 = time.monotonic()
        deleted = run_cli("queue", "delete", "--domain", DEAD, *admin, timeout_s=CLI_S)
        returned = time.monotonic() - t0
        gone = _wait_gone(c, returned + CLI_S)
        found["queue delete --domain"] = (
            f"returned after {returned:.1f} s, none left on any node after {gone:.1f} s; "
            f"{(deleted.stdout.strip().splitlines() or [deleted.stderr.strip()])[0]}"
        )
    finally:
        c.stop()
        shutil.rmtree(tmp / "deep", ignore_errors=True)
    return found


def _seed(base: Path) -> Path:
    """A fresh one-node cluster's snapshot: the Raft position the deep state starts at."""
    dest = base.parent / "seed.bin"
    with Cluster(base, 1, start_timeout_s=60) as c:
        post_json(c, 0, "/raft/compact", {})
        path = c.nodes[0].data_dir / "snapshot.bin"
        _until("the seed snapshot", lambda: _header_index(path) is not None, 30)
        shutil.copyfile(path, dest)
    shutil.rmtree(base, ignore_errors=True)
    return dest


def _add_follower(c: Cluster) -> float:
    i = c.add_node()
    c.start_node(i, timeout_s=120)
    t0 = time.monotonic()
    add = run_cli(
        "cluster",
        "add-node",
        c.nodes[i].raft_addr,
        "--admin",
        c.nodes[0].admin_addr,
        "--admin-token-file",
        str(c.admin_token_file),
        "--timeout-s",
        "120",
        timeout_s=CLI_S,
    )
    # A member added to a one-node cluster is half of a majority of two: the change
    # commits only once the new node has the snapshot, often after add-node's wait.
    if add.returncode != 0 and "not committed within" not in add.stderr:
        raise postfix.PostfixBenchError(f"add-node failed: {add.stderr.strip()}")
    target = c.status(0)["last_applied"]

    def caught_up() -> bool:
        s = c.try_get(i, "/status")
        return bool(s) and int(s.get("last_applied") or 0) >= target

    _until("the added follower's catch-up", caught_up, 1800)
    return time.monotonic() - t0


def _steady(c: Cluster, per_s: float) -> str:
    """Wait (at most STEADY_MAX_S) until the leader defers the dead destination's mail at
    about the rate it comes due: what came due while the cluster was growing (a member
    added to one node holds commits until it has the snapshot) is deferred first, so
    that fresh mail is measured against the steady state, not that catch-up."""
    t0 = time.monotonic()
    lead = c.leader()
    last = _deferred(c, lead)
    while time.monotonic() - t0 < STEADY_MAX_S:
        time.sleep(STEADY_WINDOW_S)
        now = _deferred(c, lead)
        rate, last = (now - last) / STEADY_WINDOW_S, now
        if rate <= 2 * per_s:
            return f"{time.monotonic() - t0:.0f} s; deferring {rate:.0f}/s"
    return f"not within {STEADY_MAX_S:.0f} s; deferring {rate:.0f}/s"


def _deferred(c: Cluster, i: int) -> float:
    text = http_get(c.nodes[i].admin_url + "/metrics", timeout_s=10).decode()
    for line in text.splitlines():
        if line.startswith('mqnode_delivery_recipients_total{outcome="deferred"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _fresh(c: Cluster, sink: Sink, n: int, plan: Plan) -> tuple[float, float]:
    """(accepted msg/s, delivered msg/s) of `n` fresh messages, after an unmeasured fifth."""
    smtp = c.nodes[c.leader()].smtp_port
    warm = max(100, n // 5)
    before = len(sink.datas)
    postfix.run_source(smtp, warm, plan.sessions, KIB, max_s=plan.max_s, to=f"u@{LIVE}")
    _arrivals(sink, before + warm, plan.max_s)
    before = len(sink.datas)
    t0 = time.monotonic()
    _, rate = postfix.run_source(smtp, n, plan.sessions, KIB, max_s=plan.max_s * 3, to=f"u@{LIVE}")
    times = _arrivals(sink, before + n, plan.max_s * 3)
    return rate, n / (times[-1] - t0)


def _arrivals(sink: Sink, n: int, timeout_s: float) -> list[float]:
    try:
        return arrival_times(sink, n, timeout_s)
    except TimeoutError as exc:
        raise postfix.PostfixBenchError(str(exc)) from exc


def _rss(c: Cluster) -> str:
    """Each node process's VmRSS and RssAnon (MiB), from /proc."""
    parts = []
    for node in c.nodes:
        if node.proc is None or node.proc.poll() is not None:
            continue
        st = _proc_status(node.proc.pid)
        parts.append(
            f"{node.node_id} {st.get('VmRSS', 0) / 1024:,.0f} MiB "
            f"(anon {st.get('RssAnon', 0) / 1024:,.0f}, peak {st.get('VmHWM', 0) / 1024:,.0f})"
        )
    return "; ".join(parts)


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def _compact(c: Cluster, i: int) -> float:
    path = c.nodes[i].data_dir / "snapshot.bin"
    applied = c.status(i)["last_applied"]
    t0 = time.monotonic()
    post_json(c, i, "/raft/compact", {})
    _until("the compaction", lambda: (_header_index(path) or 0) >= applied, CLI_S)
    return time.monotonic() - t0


def _wait_gone(c: Cluster, timeout_s: float) -> float:
    t0 = time.monotonic()

    def gone() -> bool:
        for i in c.live_indexes():
            s = c.try_get(i, "/status", timeout_s=10)
            q = (s or {}).get("queue") or {}
            if not s or q.get("deferred", 1) + q.get("active", 0) + q.get("hold", 0) > 0:
                return False
        return True

    _until("the deleted messages gone on every node", gone, timeout_s)
    return time.monotonic() - t0


def _header_index(path: Path) -> int | None:
    try:
        return snapshot_file.read_header(path).index
    except Exception:  # not written yet, or being replaced
        return None


def _until(what: str, probe: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    raise postfix.PostfixBenchError(f"{what}: not within {timeout_s:.0f} s")
