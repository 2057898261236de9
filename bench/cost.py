"""cost: what one message costs the machine that accepts it, against Postfix's.

Co-located rates share two cores among three nodes, two SMTP workers each and
the load generator; on three real machines what a user gets is set by the cost
on the machine that accepts. This workload measures it directly, from /proc:

* CPU: user + system time of each process, microseconds per message. mqnode's
  leader machine is the leader's node process and its SMTP workers; each
  follower is reported too. Postfix is every process of its instance (master,
  smtpd, cleanup, qmgr, trivial-rewrite, smtp, ...): the live ones' own time,
  plus the master's reaped children's. Its daemons are kept alive for the whole
  run (`max_use`, `max_idle`), so that their I/O counters are not lost at exit.
* Bytes written: each process's `write_bytes` (/proc/PID/io: bytes it sent to
  the storage layer, fsynced or written back later) per message.

Both do the whole job: smtp-source into the leader / Postfix, each relaying to
its own smtp-sink (mqnode: the relay host; Postfix: its relayhost), measured
until the sink has every message. Sizes: 1 KiB and 100 KiB.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import postfix
from bench.plan import KIB, SMTP_SOURCE, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import Row
from tests.support.cluster import Cluster, free_ports

HOST = "127.0.0.1"
SIZES = (KIB, 100 * KIB)
MESSAGES = {"quick": {KIB: 2000, 100 * KIB: 500}, "full": {KIB: 20000, 100 * KIB: 3000}}
# Keep Postfix's daemons alive through the run: a reaped daemon's I/O counters are lost.
LONG_LIVED = {"max_use": "1000000", "max_idle": "3600"}
TICKS = os.sysconf("SC_CLK_TCK")


def cost(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    why = postfix.available()
    if why is not None:
        step(f"cost: skipped ({why})")
        out.rows.append(Row("cost", "Postfix", note=f"skipped: {why}"))
        return
    for size in SIZES:
        messages = MESSAGES.get(plan.mode, MESSAGES["quick"])[size]
        params: dict[str, Any] = {"size": size, "sessions": plan.sessions, "messages": messages}
        params["generator"] = SMTP_SOURCE
        try:
            step(f"cost: Postfix, {size // KIB} KiB")
            ref = _postfix(messages, size, plan)
            step(f"cost: mqnode, {size // KIB} KiB")
            rows = _mqnode(messages, size, plan, tmp / f"mqnode-{size}")
        except postfix.PostfixBenchError as exc:  # reported in its row, the run goes on
            out.rows.append(Row("cost", f"{size // KIB} KiB", dict(params), note=f"failed: {exc}"))
            continue
        for name, (cpu_us, written, rate) in [("Postfix, all processes", ref), *rows]:
            row = Row("cost", name, dict(params), rate=rate)
            row.acked = row.attempted = messages
            row.extra = {"cpu_us_per_msg": round(cpu_us), "bytes_per_msg": round(written)}
            row.note = f"CPU {cpu_us:,.0f} us/msg, written {written / KIB:,.1f} KiB/msg"
            if name != "Postfix, all processes" and ref[0] and ref[1]:
                row.note += f"; x Postfix: CPU {cpu_us / ref[0]:.2f}, bytes {written / ref[1]:.2f}"
            out.rows.append(row)


def _postfix(messages: int, size: int, plan: Plan) -> tuple[float, float, float]:
    smtp_port, relay_port = free_ports(2)
    with (
        # Its own temporary directory, as measure_postfix's: the postfix user must reach it.
        tempfile.TemporaryDirectory(prefix="bench-postfix-") as base,
        postfix.smtp_sink(relay_port) as sink,
        postfix.throwaway_postfix(
            Path(base), smtp_port, relay_port, extra_main_cf=LONG_LIVED
        ) as inst,
    ):
        master = inst.master_pid()
        if master is None:
            raise postfix.PostfixBenchError("no Postfix master")
        warm = messages // 5
        zero = sink.received()  # our readiness probes are sessions, not messages
        postfix.run_source(smtp_port, warm, plan.sessions, size, max_s=plan.max_s)
        sink.wait_for(zero + warm, plan.max_s)
        start = sink.received()
        before = _group(master)
        t0 = time.monotonic()
        postfix.run_source(smtp_port, messages, plan.sessions, size, max_s=plan.max_s)
        if not sink.wait_for(start + messages, plan.max_s):
            raise postfix.PostfixBenchError("Postfix: the sink did not get every message")
        elapsed = time.monotonic() - t0
        after = _group(master)
    return (*_per_message(before, after, messages), messages / elapsed)


def _mqnode(
    messages: int, size: int, plan: Plan, base: Path
) -> list[tuple[str, tuple[float, float, float]]]:
    relay_port = free_ports(1)[0]
    with (
        postfix.smtp_sink(relay_port) as sink,
        bench_cluster(base, 3, relay=f"{HOST}:{relay_port}", extra=WORKERS) as c,
    ):
        lead = c.leader()
        port = c.nodes[lead].smtp_port
        warm = messages // 5
        zero = sink.received()
        postfix.run_source(port, warm, plan.sessions, size, max_s=plan.max_s)
        sink.wait_for(zero + warm, plan.max_s)
        start = sink.received()
        before = {i: _tree(c, i) for i in range(3)}
        t0 = time.monotonic()
        postfix.run_source(port, messages, plan.sessions, size, max_s=plan.max_s)
        if not sink.wait_for(start + messages, plan.max_s):
            raise postfix.PostfixBenchError("mqnode: the sink did not get every message")
        elapsed = time.monotonic() - t0
        after = {i: _tree(c, i) for i in range(3)}
        if c.leader() != lead:
            raise postfix.PostfixBenchError("mqnode: the leader changed during the run")
    rate = messages / elapsed

    def of(i: int) -> tuple[float, float, float]:
        return (*_per_message(before[i], after[i], messages), rate)

    out = [("mqnode leader machine (node + 2 SMTP workers)", of(lead))]
    followers = [i for i in range(3) if i != lead]
    out += [(f"mqnode follower {n}", of(i)) for n, i in enumerate(followers, 1)]
    return out


def _per_message(
    before: tuple[float, int], after: tuple[float, int], messages: int
) -> tuple[float, float]:
    return (after[0] - before[0]) * 1e6 / messages, (after[1] - before[1]) / messages


def _tree(c: Cluster, i: int) -> tuple[float, int]:
    proc = c.nodes[i].proc
    if proc is None:
        raise postfix.PostfixBenchError(f"node {i} is not running")
    pids = [proc.pid, *_children(proc.pid)]
    return _sum(pids, reaped_of=proc.pid)


def _group(master: int) -> tuple[float, int]:
    """The Postfix instance: its master is a session leader; every daemon is in its group."""
    pids = [p for p in _all_pids() if (st := _stat(p)) is not None and st[2] == master]
    return _sum(pids, reaped_of=master)


def _sum(pids: list[int], reaped_of: int) -> tuple[float, int]:
    """CPU seconds (plus `reaped_of`'s reaped children's) and bytes written, summed."""
    cpu, written = 0.0, 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        cpu += (st[3] + st[4] + (st[5] + st[6] if pid == reaped_of else 0)) / TICKS
        written += _write_bytes(pid)
    return cpu, written


def _stat(pid: int) -> tuple[int, int, int, int, int, int, int] | None:
    """(pid, ppid, pgrp, utime, stime, cutime, cstime) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    # After "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime ...
    ppid, pgrp = int(rest[1]), int(rest[2])
    return (pid, ppid, pgrp, int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14]))


def _write_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _children(parent: int) -> list[int]:
    return [p for p in _all_pids() if (st := _stat(p)) is not None and st[1] == parent]
