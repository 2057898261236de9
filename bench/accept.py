"""Acceptance throughput and latency of a 3-node cluster, as ratios to the Python ceiling.

    python -m bench.accept [--messages N] [--concurrency C] [--size BYTES]

In one run on one machine: (1) an aiosmtpd null handler (no storage), (2) a
3-node mqnode cluster submitting to the leader, (3) the same cluster
submitting to a follower. Reports msg/s, p50/p99 latency from connect to
the 250, and each mqnode rate as a ratio to the null handler. Appends a
markdown table with the exact command to docs/benchmarks.md (--record).
Bounded: N messages per row, and at most --max-s seconds per row.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LoadGen, LoadResult
from tests.support.cluster import FAST_TUNING, Cluster, free_ports


@dataclass
class Row:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    acked: int
    attempted: int


def measure(name: str, port: int, n: int, conc: int, size: int, max_s: float) -> Row:
    gen = LoadGen([("127.0.0.1", port)], concurrency=conc, size=size, run_id=name)
    t0 = time.monotonic()
    res: LoadResult = asyncio.run(gen.run(n, max_s))
    elapsed = time.monotonic() - t0
    lat = sorted((a.end_s - a.start_s) * 1000 for a in res.attempts if a.code == 250)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return Row(
        name,
        len(lat) / elapsed,
        statistics.median(lat) if lat else float("nan"),
        p99,
        len(lat),
        len(res.attempts),
    )


def run(n: int, conc: int, size: int, max_s: float) -> list[Row]:
    rows: list[Row] = []
    port = free_ports(1)[0]
    null = subprocess.Popen(
        [sys.executable, "-m", "bench.nullsmtp", "--listen", f"127.0.0.1:{port}"]
    )
    try:
        time.sleep(1.0)
        rows.append(measure("aiosmtpd null handler", port, n, conc, size, max_s))
    finally:
        null.terminate()
        null.wait(timeout=10)
    with (
        tempfile.TemporaryDirectory(prefix="bench-accept-") as tmp,
        Cluster(Path(tmp), extra_args=FAST_TUNING) as c,
    ):
        lead = c.leader()
        rows.append(
            measure("mqnode 3 nodes, to leader", c.nodes[lead].smtp_port, n, conc, size, max_s)
        )
        fol = c.followers()[0]
        rows.append(
            measure("mqnode 3 nodes, to follower", c.nodes[fol].smtp_port, n, conc, size, max_s)
        )
    return rows


def table(rows: list[Row], command: str) -> str:
    base = rows[0].rate
    out = [
        f"    {command}",
        "",
        "| row | msg/s | ratio to null handler | p50 ms | p99 ms | acked/attempted |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r.name} | {r.rate:.0f} | {r.rate / base:.2f} | {r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.acked}/{r.attempted} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accept", description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--max-s", type=float, default=60.0)
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = ap.parse_args(argv)
    command = (
        f"python -m bench.accept --messages {args.messages} --concurrency {args.concurrency} "
        f"--size {args.size}"
    )
    rows = run(args.messages, args.concurrency, args.size, args.max_s)
    text = table(rows, command)
    print(text)
    if args.record:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open("docs/benchmarks.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Acceptance, {args.size} B, {args.concurrency} sessions ({stamp})\n\n")
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
