"""How long a follower with a long Raft log takes to come back after kill -9.

    python -m bench.restart                       # 3,000 x 100 KiB queued, then kill a follower
    python -m bench.restart --messages 1000 --size 10240

Fills a 3-node cluster's queue through the leader with smtp-source (nothing
is delivered, so the state and, past 64 MiB of state, the log grow: design
W16 lets the log hold about half the state's bytes before a snapshot), kills
one follower with SIGKILL, starts it again and reports the seconds until its
admin endpoint answers and until it has applied the leader's commit index,
with the log's entries and bytes on disk at the kill. Bounded: one fill of at
most --max-s seconds, waits of at most --max-s; the cluster is stopped by PID
and its data deleted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.smtptools import run_source, which
from bench.workloads import bench_cluster


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.restart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--max-s", type=float, default=300.0)
    args = ap.parse_args(argv)
    which("smtp-source")
    with (
        tempfile.TemporaryDirectory(prefix="mqnode-restart-") as tmp,
        bench_cluster(Path(tmp), 3) as c,
    ):
        lead = c.leader()
        elapsed, rate = run_source(
            c.nodes[lead].smtp_port, args.messages, args.sessions, args.size, max_s=args.max_s
        )
        print(f"filled: {args.messages} x {args.size} B in {elapsed:.1f} s ({rate:.0f} msg/s)")
        f = c.followers()[0]
        node = c.nodes[f]
        st = c.status(f)
        raft_bytes = _dir_bytes(node.data_dir / "raft")
        state_bytes = _dir_bytes(node.data_dir) - raft_bytes
        print(
            f"follower {node.node_id}: {st['log_entries']} log entries, raft dir "
            f"{raft_bytes / 2**20:.0f} MiB, rest of the data dir {state_bytes / 2**20:.0f} MiB"
        )
        c.kill(f)
        t0 = time.monotonic()
        c.spawn(f)
        c.wait_admin_up([f], args.max_s)
        up = time.monotonic() - t0
        target = c.status(lead)["commit_index"]
        deadline = t0 + args.max_s
        while c.status(f)["last_applied"] < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"{node.node_id} not caught up after {args.max_s:.0f} s")
            time.sleep(0.05)
        caught = time.monotonic() - t0
        print(f"restart after kill -9: admin up in {up:.2f} s, caught up in {caught:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
