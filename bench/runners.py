"""Building blocks of the bench suite: one measured load run, the reference servers, a sink.

A `Row` is one line of a results table. `measure()` drives our async load
generator against one or more SMTP targets and turns the replies into a row
(rate of 250s over the run's wall time; DATA-to-250 latency percentiles).
`null_server()` runs the aiosmtpd null handler (the Python SMTP ceiling) or
the end-to-end sink in its own process; `SinkCount` reads what the sink got.

Every process started here is stopped by PID when its context exits; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import TEXT, LoadGen, LoadResult
from bench.smtptools import stop_process

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0


@dataclass
class Row:
    workload: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    rate: float | None = None  # messages/s answered 250 (or received, for end to end)
    p50_ms: float | None = None
    p99_ms: float | None = None
    acked: int = 0
    attempted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def row_from(
    workload: str,
    name: str,
    params: dict[str, Any],
    result: LoadResult,
    elapsed_s: float,
) -> Row:
    lat = sorted(a.data_s * 1000 for a in result.attempts if a.code == 250)
    return Row(
        workload,
        name,
        dict(params),
        rate=len(lat) / elapsed_s if elapsed_s > 0 else None,
        p50_ms=percentile(lat, 0.50),
        p99_ms=percentile(lat, 0.99),
        acked=len(lat),
        attempted=len(result.attempts),
    )


def run_load(
    targets: list[tuple[str, int]],
    count: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    max_s: float = 60.0,
    rate_per_s: float | None = None,
    run_id: str = "bench",
    content: str = TEXT,
) -> tuple[LoadResult, float]:
    gen = LoadGen(
        targets,
        concurrency=sessions,
        size=size,
        recipients=recipients,
        run_id=run_id,
        rate_per_s=rate_per_s,
        content=content,
    )
    started = time.monotonic()
    result = asyncio.run(gen.run(count, max_s))
    return result, time.monotonic() - started


def measure(
    workload: str,
    name: str,
    targets: list[tuple[str, int]],
    params: dict[str, Any],
    max_s: float,
    rate_per_s: float | None = None,
) -> Row:
    result, elapsed = run_load(
        targets,
        params["messages"],
        params["sessions"],
        params["size"],
        params.get("recipients", 1),
        max_s,
        rate_per_s,
        run_id=f"{workload}-{name}".replace(" ", "-"),
    )
    return row_from(workload, name, params, result, elapsed)


def wait_port(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout_s:.0f}s")


@contextmanager
def null_server(
    port: int, count_file: Path | None = None, uvloop: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "bench.nullsmtp", "--listen", f"{HOST}:{port}"]
    if count_file is not None:
        cmd += ["--count-file", str(count_file)]
    if uvloop:
        cmd.append("--uvloop")
    proc = subprocess.Popen(cmd)
    try:
        wait_port(port)
        yield proc
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class SinkCount:
    messages: int
    recipients: int
    first_s: float  # wall clock of the first message (time.time())
    last_s: float

    @staticmethod
    def read(path: Path) -> SinkCount:
        try:
            parts = path.read_text().split()
            return SinkCount(int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3]))
        except (OSError, ValueError, IndexError):
            return SinkCount(0, 0, 0.0, 0.0)


def wait_sink(path: Path, messages: int, timeout_s: float) -> SinkCount:
    """Poll the sink's count file until it has `messages` or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    got = SinkCount.read(path)
    while got.messages < messages and time.monotonic() < deadline:
        time.sleep(0.1)
        got = SinkCount.read(path)
    return got
