"""Where a message's time and CPU go: one smtp-source run into a 3-node cluster's leader.

    python -m bench.profile                       # 10,000 x 1 KiB, 20 sessions
    python -m bench.profile --sessions 40 --smtp-workers 2
    python -m bench.profile --e2e                 # relay to smtp-sink, until it has all

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
delivery kept up with acceptance or drained the queue afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.smtptools import Sink, run_source, smtp_sink, which
from bench.workloads import HOST, bench_cluster
from tests.support.cluster import free_ports, http_get

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
        if line.startswith("mqnode_commit_seconds_"):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--smtp-workers", type=int, default=0)
    ap.add_argument("--max-s", type=float, default=120.0)
    ap.add_argument("--e2e", action="store_true", help="relay to smtp-sink; time until drained")
    args = ap.parse_args(argv)
    which("smtp-source")  # fails early with the reason when Postfix's tools are absent
    extra = ("--smtp-workers", str(args.smtp_workers)) if args.smtp_workers else ()
    with (
        tempfile.TemporaryDirectory(prefix="mqnode-profile-") as tmp,
        _sink(args.e2e) as sink,
        bench_cluster(
            Path(tmp), 3, relay=None if sink is None else f"{HOST}:{sink.port}", extra=extra
        ) as c,
    ):
        lead = c.leader()
        port, admin = c.nodes[lead].smtp_port, c.nodes[lead].admin_port
        run_source(port, 500, args.sessions, args.size, max_s=args.max_s)  # warm up
        roles: dict[int, str] = {}
        for i, node in enumerate(c.nodes):
            assert node.proc is not None  # started by the cluster
            roles[node.proc.pid] = f"node {node.node_id}" + (" (leader)" if i == lead else "")
        h0, p0, b0 = _commit_histogram(admin), _proc_cpu(), _busy()
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if sink is not None:
            sink.wait_for(500, args.max_s)
            before = sink.received()
        t0 = time.monotonic()
        run_source(port, args.messages, args.sessions, args.size, max_s=args.max_s)
        elapsed = time.monotonic() - t0
        if sink is not None:
            during = sink.received() - before
            if not sink.wait_for(before + args.messages, args.max_s):
                print(f"smtp-sink got {sink.received() - before} of {args.messages} in time")
            accepted_s, elapsed = elapsed, time.monotonic() - t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        h1, p1, b1 = _commit_histogram(admin), _proc_cpu(), _busy()
    n = args.messages
    rate = n / elapsed
    delta = {k: v - h0.get(k, 0.0) for k, v in h1.items()}
    commits = delta.get("mqnode_commit_seconds_count", 0.0) or 1.0
    mean_ms = delta.get("mqnode_commit_seconds_sum", 0.0) / commits * 1000
    busy = 1 - (b1[1] - b0[1]) / max(b1[0] - b0[0], 1)
    print(
        f"{rate:,.0f} msg/s ({n} x {args.size} B, {args.sessions} sessions, "
        f"smtp_workers={args.smtp_workers}); machine busy {busy * 100:.0f}% of all CPUs"
    )
    if sink is not None:
        print(
            f"end to end: accepted in {accepted_s:.2f} s ({n / accepted_s:,.0f} msg/s), "
            f"{during} delivered during acceptance, all delivered after {elapsed:.2f} s"
        )
    print(
        f"per-message cycle of one session: {args.sessions / rate * 1000:.1f} ms; "
        f"leader submit-to-commit: mean {mean_ms:.1f} ms, p50 <= {_quantile(delta, 0.5)} s, "
        f"p90 <= {_quantile(delta, 0.9)} s"
    )
    rows: list[tuple[float, float, str]] = []
    for pid, (name, ppid, user, system) in p1.items():
        _, _, user0, system0 = p0.get(pid, (name, ppid, 0.0, 0.0))
        used, kernel = user + system - user0 - system0, system - system0
        if used <= 0:
            continue
        label = roles.get(pid) or (f"smtp worker of {roles[ppid]}" if ppid in roles else name)
        rows.append((used, kernel, f"{label} [{pid}]"))
    source = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    rows.append((source, kids1.ru_stime - kids0.ru_stime, "smtp-source (reaped child)"))
    print(f"  {'process':40s} {'CPU':>12s}  {'per message':>11s}  {'of it in kernel':>15s}")
    for used, kernel, label in sorted(rows, reverse=True)[:10]:
        print(
            f"  {label:40s} {used / elapsed * 100:5.0f}% of a core  {used / n * 1e6:6.0f} us/msg"
            f"  {kernel / n * 1e6:9.0f} us/msg"
        )
    return 0


@contextlib.contextmanager
def _sink(wanted: bool) -> Iterator[Sink | None]:
    if not wanted:
        yield None
        return
    with smtp_sink(free_ports(1)[0]) as sink:
        yield sink


if __name__ == "__main__":
    raise SystemExit(main())
