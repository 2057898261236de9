"""Where a message's time and CPU go: one smtp-source run into a 3-node cluster's leader.

    python -m bench.profile                       # 10,000 x 1 KiB, 20 sessions
    python -m bench.profile --sessions=40 --smtp-workers 2
    python -m bench.profile --e2e                 # relay to smtp-sink, until it has all
    python -m bench.profile --drain               # queue first, then time delivery alone
    python -m bench.profile --warm-up 0 --size 5242880 --messages 80   # a cold cluster
    python -m bench.profile --nodes 1 --smtp-workers 2   # no replication: what consensus costs

Prints the rate, the leader's submit-to-commit latency (the
`mqnode_commit_seconds` histogram from its /metrics, before and after the
run) against the whole per-message cycle of one session (sessions / rate),
and the CPU each process used per message (from /proc; smtp-source's from
this process's reaped children). A rate bound by the time to a 250 shows as
a commit time that is most of the cycle while no process is near 100% of a
core; a CPU-bound one as the machine near 100% busy. Bounded: one run of
at most --max-s seconds; the cluster is stopped by PID and its data deleted.

With --e2e the leader relays to a local smtp-sink and the run lasts until
the sink has every message; "delivered during acceptance" then tells whether
delivery kept up with acceptance or drained the queue afterwards. With
--drain the messages are queued while the relay is down (first attempts
defer for an hour), then smtp-sink starts, the queue is retried, and the
window measured is delivery alone: claim, SMTP transaction, outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.smtptools import HOST, Sink, attachment_message, run_source, smtp_sink, which
from bench.workloads import bench_cluster
from tests.support.chaos import post_json
from tests.support.cluster import Cluster, free_ports, http_get

TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu() -> dict[int, tuple[str, int, float, float]]:
    """pid -> (name, parent pid, user CPU seconds, system CPU seconds) of every process."""
    out: dict[int, tuple[str, int, float, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(d)] = (name, int(fields[1]), int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return out


def _busy() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def _commit_histogram(admin_port: int) -> dict[str, float]:
    text = http_get(f"http://127.0.0.1:{admin_port}/metrics").decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("mqnode_commit_seconds_", "mqnode_raft_commit_index ")):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _quantile(delta: dict[str, float], q: float) -> str:
    """Upper bound of the histogram bucket holding quantile q."""
    count = delta.get("mqnode_commit_seconds_count", 0.0)
    for key, value in delta.items():
        if "_bucket" in key and value >= q * count:
            return key.split('le="')[1].rstrip('"}')
    return "?"


@dataclass
class Window:
    """What one measured run used: time, per-process CPU and the leader's commit histogram."""

    elapsed_s: float
    note: str
    cpu: list[tuple[float, float, str]]  # (CPU s, of it kernel s, process label)
    busy: float
    commits: dict[str, float]


class Measure:
    """Snapshots taken around the measured part of a run (one per run)."""

    def __init__(self, c: Cluster, lead: int) -> None:
        self._admin = c.nodes[lead].admin_port
        self._roles: dict[int, str] = {}
        for i, node in enumerate(c.nodes):
            assert node.proc is not None  # started by the cluster
            self._roles[node.proc.pid] = f"node {node.node_id}" + (" (leader)" * (i == lead))

    def start(self) -> None:
        self._h0, self._p0, self._b0 = _commit_histogram(self._admin), _proc_cpu(), _busy()
        self._kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t0 = time.monotonic()

    def stop(self, note: str = "") -> Window:
        elapsed = time.monotonic() - self._t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        h1, p1, b1 = _commit_histogram(self._admin), _proc_cpu(), _busy()
        rows: list[tuple[float, float, str]] = []
        for pid, (name, ppid, user, system) in p1.items():
            _, _, user0, system0 = self._p0.get(pid, (name, ppid, 0.0, 0.0))
            used, kernel = user + system - user0 - system0, system - system0
            if used > 0:
                label = self._roles.get(pid) or (
                    f"smtp worker of {self._roles[ppid]}" if ppid in self._roles else name
                )
                rows.append((used, kernel, f"{label} [{pid}]"))
        k0 = self._kids0
        source = (kids1.ru_utime + kids1.ru_stime) - (k0.ru_utime + k0.ru_stime)
        if source > 0:
            rows.append((source, kids1.ru_stime - k0.ru_stime, "smtp-source (reaped child)"))
        busy = 1 - (b1[1] - self._b0[1]) / max(b1[0] - self._b0[0], 1)
        commits = {k: v - self._h0.get(k, 0.0) for k, v in h1.items()}
        return Window(elapsed, note, sorted(rows, reverse=True), busy, commits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument(
        "--attachment",
        action="store_true",
        help="--size bytes of mail with a base64 attachment instead of smtp-source's text "
        "(one message sent again and again: mqnode replicates each copy, then keeps the "
        "first as their retries; the accept path's cost, nothing to deliver)",
    )
    ap.add_argument("--smtp-workers", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=3, choices=(1, 3, 5))
    ap.add_argument("--max-s", type=float, default=120.0)
    ap.add_argument(
        "--warm-up", type=int, default=500, help="messages sent before measuring (0: a cold run)"
    )
    ap.add_argument(
        "--node-args", default="", help='more flags for every node, e.g. "--lease-ms 5000"'
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--e2e", action="store_true", help="relay to smtp-sink; time until drained")
    mode.add_argument(
        "--drain", action="store_true", help="queue with the sink down, then time delivery alone"
    )
    args = ap.parse_args(argv)
    which("smtp-source")  # fails early with the reason when Postfix's tools are absent
    extra = ("--smtp-workers", str(args.smtp_workers)) if args.smtp_workers else ()
    extra = (*extra, *shlex.split(args.node_args))
    sink_port = free_ports(1)[0]
    relay = f"{HOST}:{sink_port}" if args.e2e or args.drain else None
    if args.drain:  # nothing listens yet: every first attempt defers, for the retry delay
        extra = (*extra, "--retry-base-s", "3600", "--retry-max-s", "3600")
    with (
        tempfile.TemporaryDirectory(prefix="mqnode-profile-") as tmp,
        bench_cluster(Path(tmp), args.nodes, relay=relay, extra=extra) as c,
    ):
        args.message_file = (
            attachment_message(args.size, Path(tmp) / "message.eml") if args.attachment else None
        )
        lead = c.leader()
        port = c.nodes[lead].smtp_port
        if args.drain:
            window = _drain(c, lead, sink_port, args)
        else:
            with _sink(sink_port if args.e2e else None) as sink:
                if args.warm_up:
                    _send(port, args.warm_up, args)
                    if sink is not None:
                        sink.wait_for(args.warm_up, args.max_s)
                window = _accept(c, lead, sink, args)
    _report(window, args)
    return 0


def _send(port: int, messages: int, args: argparse.Namespace) -> None:
    """`messages` from smtp-source into `port`, as the arguments say."""
    run_source(
        port,
        messages,
        args.sessions,
        args.size,
        max_s=args.max_s,
        message_file=args.message_file,
    )


def _accept(c: Cluster, lead: int, sink: Sink | None, args: argparse.Namespace) -> Window:
    """smtp-source into the leader; with a sink, until the sink has every message."""
    m = Measure(c, lead)
    before = 0 if sink is None else sink.received()
    m.start()
    t0 = time.monotonic()
    _send(c.nodes[lead].smtp_port, args.messages, args)
    if sink is None:
        return m.stop()
    accepted_s, during = time.monotonic() - t0, sink.received() - before
    if not sink.wait_for(before + args.messages, args.max_s):
        print(f"smtp-sink got {sink.received() - before} of {args.messages} in time")
    return m.stop(
        f"end to end: accepted in {accepted_s:.2f} s ({args.messages / accepted_s:,.0f} msg/s), "
        f"{during} delivered during acceptance, all delivered after {time.monotonic() - t0:.2f} s"
    )


def _drain(c: Cluster, lead: int, sink_port: int, args: argparse.Namespace) -> Window:
    """Queue everything while the relay is down, then measure delivering it alone."""
    n = args.messages
    port = c.nodes[lead].smtp_port
    _send(port, n, args)
    deadline = time.monotonic() + args.max_s
    while c.status(lead)["queue"].get("deferred", 0) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"not all deferred in time: {c.status(lead)['queue']}")
        time.sleep(0.2)
    with _sink(sink_port) as sink:
        assert sink is not None
        m = Measure(c, lead)
        m.start()
        post_json(c, lead, "/queue/retry", {"state": "deferred"})
        drained = sink.wait_for(n, args.max_s)
        return m.stop("" if drained else f"smtp-sink got {sink.received()} of {n} in time")


def _report(w: Window, args: argparse.Namespace) -> None:
    n = args.messages
    rate = n / w.elapsed_s
    what = "delivered (delivery alone)" if args.drain else "msg/s"
    print(
        f"{rate:,.0f} {what} ({n} x {args.size} B, {args.sessions} sessions, "
        f"smtp_workers={args.smtp_workers}{' ' + args.node_args if args.node_args else ''}); "
        f"machine busy {w.busy * 100:.0f}% of all CPUs"
    )
    if w.note:
        print(w.note)
    commits = w.commits.get("mqnode_commit_seconds_count", 0.0) or 1.0
    mean_ms = w.commits.get("mqnode_commit_seconds_sum", 0.0) / commits * 1000
    if not args.drain:
        print(f"per-message cycle of one session: {args.sessions / rate * 1000:.1f} ms; ", end="")
    print(
        f"leader submit-to-commit: mean {mean_ms:.1f} ms, "
        f"p50 <= {_quantile(w.commits, 0.5)} s, p90 <= {_quantile(w.commits, 0.9)} s"
    )
    entries = w.commits.get("mqnode_raft_commit_index", 0.0)
    print(
        f"log entries committed: {entries:,.0f} ({n / max(entries, 1):.1f} messages per entry, "
        f"{entries / w.elapsed_s:,.0f} entries/s)"
    )
    print(f"  {'process':40s} {'CPU':>12s}  {'per message':>11s}  {'of it in kernel':>15s}")
    for used, kernel, label in w.cpu[:10]:
        share = used / w.elapsed_s * 100
        print(
            f"  {label:40s} {share:5.0f}% of a core  {used / n * 1e6:6.0f} us/msg"
            f"  {kernel / n * 1e6:9.0f} us/msg"
        )


@contextlib.contextmanager
def _sink(port: int | None) -> Iterator[Sink | None]:
    if port is None:
        yield None
        return
    with smtp_sink(port) as sink:
        yield sink


if __name__ == "__main__":
    raise SystemExit(main())
