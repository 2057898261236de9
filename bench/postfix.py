"""Postfix and smtp-source/smtp-sink reference rows for the bench suite.

    python -m bench.postfix [--messages N] [--sessions S] [--size BYTES]
                            [--recipients R] [--max-s T]

Three rows, driven by Postfix's own load generator (smtp-source), not ours:

    smtp-source -> smtp-sink   the loopback SMTP ceiling: what SMTP costs on
                               this machine with no storage at all.
    Postfix accept             smtp-source into a throwaway Postfix that relays
                               every message to smtp-sink: messages / time
                               until smtp-source got its last 250. The relay
                               sink runs during the whole run, so the queue
                               drains while mail comes in (as in mqnode).
    Postfix end to end         the same run: messages / time until smtp-sink
                               counted every message.

Postfix fsyncs each queue file before its 250 (cleanup(8)); that default is
kept, because it is the durability bar mqnode must meet with replication on
top. smtp-source opens a new connection per message unless keep_session.

Requirements. `postfix`, `smtp-source` and `smtp-sink` on PATH or in
/usr/sbin or /usr/local/sbin, and root to start the private Postfix (postfix(1)
refuses otherwise). This module never installs anything: available() says
why a row cannot run, and reference_rows() turns that into a skipped row with
that note. The ceiling row needs only smtp-source and smtp-sink, whose
wrappers (smtp_sink, run_source) live in bench/smtptools.py and are
re-exported here.

The throwaway instance (throwaway_postfix) lives under one directory: its own
config_directory, queue_directory, data_directory and maillog_file. It listens
on 127.0.0.1:smtp_port only, relays everything to [127.0.0.1]:relay_port, does
no local delivery, never asks the system resolver (smtp_dns_support_level =
disabled, smtp_host_lookup = native, numeric relay host, no peer name lookup)
and runs with chroot off. It is stopped with `postfix -c DIR stop`, then by
the master's PID (process group) if that did not work.

Limits. smtp-source runs at most max_s seconds and is killed after that; the
drain wait is bounded by max_s; start and stop by start_timeout_s and
stop_timeout_s; readiness probes by count and time. All traffic on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.smtptools import (
    HOST,
    POLL_S,
    TOOLS,
    PostfixBenchError,
    Sink,
    run_source,
    search_path,
    smtp_sink,
    wait_smtp_banner,
    which,
)
from tests.support.cluster import free_ports

__all__ = [
    "PostfixBenchError",
    "PostfixInstance",
    "RefRow",
    "Sink",
    "available",
    "measure_loopback_ceiling",
    "measure_postfix",
    "reference_rows",
    "render_main_cf",
    "render_master_cf",
    "run_source",
    "smtp_sink",
    "table",
    "throwaway_postfix",
    "write_config",
]


@dataclass(frozen=True)
class RefRow:
    """One reference row: `rate` is messages / elapsed_s (NaN when skipped or failed)."""

    name: str
    messages: int
    elapsed_s: float
    rate: float
    note: str = ""


def available(path: str | None = None, *, instance: bool = True) -> str | None:
    """None when the rows can run, else the reason to print in the skipped row.

    instance=False checks only what the loopback ceiling needs (smtp-source,
    smtp-sink); instance=True also needs `postfix` and root.
    """
    names = (*TOOLS, "postfix") if instance else TOOLS
    missing = [n for n in names if shutil.which(n, path=search_path(path)) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian/Ubuntu: apt-get install postfix)"
    if instance and os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix(1) refuses otherwise)"
    return None


def render_main_cf(
    base: Path, relay_port: int, concurrency: int, extra: dict[str, str] | None = None
) -> str:
    """main.cf for a private relay-only instance whose files all live under `base`;
    `extra` adds or overrides settings (the interop tests: TLS, access maps, limits)."""
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(base / "queue"),
        "data_directory": str(base / "data"),
        "maillog_file": str(base / "maillog"),
        "maillog_file_prefixes": str(base),
        "myhostname": "postfix.bench.test",
        "mydomain": "bench.test",
        "myorigin": "$myhostname",
        "inet_interfaces": HOST,
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "mynetworks_style": "host",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "relayhost": f"[{HOST}]:{relay_port}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        # Never the system resolver: the relay host is numeric and DNS is off.
        "disable_dns_lookups": "yes",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "smtp_helo_name": "$myhostname",
        "in_flow_delay": "0",
        "default_destination_concurrency_limit": str(concurrency),
        "smtp_destination_concurrency_limit": str(concurrency),
        "initial_destination_concurrency": str(min(5, concurrency)),
        "default_process_limit": str(max(100, 2 * concurrency)),
        "biff": "no",
        "delay_warning_time": "0",
        **(extra or {}),
    }
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


# name, type, private, unpriv, chroot, wakeup, maxproc, command. Chroot off:
# a chroot would need copies of system files inside the throwaway queue.
MASTER_SERVICES = (
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),  # TLS for the interop tests
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
)


def render_master_cf(smtp_port: int) -> str:
    """master.cf: smtpd on 127.0.0.1:smtp_port only, plus the internal services."""
    rows = [(f"{HOST}:{smtp_port}", "inet", "n", "-", "n", "-", "-", "smtpd"), *MASTER_SERVICES]
    return "".join(" ".join(r) + "\n" for r in rows)


def write_config(config_dir: Path, main_cf: str, smtp_port: int) -> None:
    """main.cf and master.cf, dated a few seconds back.

    Postfix rereads a main.cf modified within the last second until it is
    stable (about 1.5 s per program); an old mtime skips that wait.
    """
    for name, text in (("main.cf", main_cf), ("master.cf", render_master_cf(smtp_port))):
        cf = config_dir / name
        cf.write_text(text)
        st = cf.stat()
        os.utime(cf, (st.st_atime - 10, st.st_mtime - 10))


@dataclass(frozen=True)
class PostfixInstance:
    """A running throwaway Postfix: `postfix -c config_dir ...` talks to it."""

    base: Path
    smtp_port: int
    relay_port: int
    postfix_bin: str

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def pid_file(self) -> Path:
        return self.base / "queue" / "pid" / "master.pid"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def ctl(self, action: str, timeout_s: float) -> None:
        """`postfix -c DIR action`; PostfixBenchError on failure or after timeout_s."""
        argv = [self.postfix_bin, "-c", str(self.config_dir), action]
        try:
            res = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PostfixBenchError(f"postfix {action} still running after {timeout_s}s") from exc
        if res.returncode != 0:
            out = (res.stderr + res.stdout).decode(errors="replace").strip()
            raise PostfixBenchError(
                f"postfix {action} exited {res.returncode}: {out[-400:]}\n{self.log_tail(5)}"
            )

    def master_pid(self) -> int | None:
        """The master's PID from its pid file, if that process is a live Postfix master."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError, IndexError):
            return None
        # "pid (comm) state ...": a zombie master has already exited.
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        return pid if comm == "master" and not rest.strip().startswith("Z") else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"


@contextlib.contextmanager
def throwaway_postfix(
    tmpdir: Path,
    smtp_port: int,
    relay_port: int,
    *,
    concurrency: int = 20,
    path: str | None = None,
    start_timeout_s: float = 30.0,
    stop_timeout_s: float = 30.0,
    extra_main_cf: dict[str, str] | None = None,
) -> Iterator[PostfixInstance]:
    """A private Postfix under tmpdir/postfix, listening on 127.0.0.1:smtp_port.

    Relays everything to [127.0.0.1]:relay_port (start the sink first or mail
    just waits in the queue). Assumes root and an installed Postfix (see
    available()). Makes tmpdir mode 0755 (the postfix user must reach its
    queue). Always stopped on exit, by PID if `postfix stop` fails.
    """
    base = Path(tmpdir) / "postfix"
    # postfix(1) chdirs to the queue before anything else, so it must exist;
    # `postfix start` creates the subdirectories and data_directory itself.
    for d in (base / "etc", base / "queue"):
        d.mkdir(parents=True)
    # Root-owned and reachable by the postfix user, or postfix-script objects.
    for d in (Path(tmpdir), base, base / "etc", base / "queue"):
        d.chmod(0o755)
    main_cf = render_main_cf(base, relay_port, concurrency, extra_main_cf)
    write_config(base / "etc", main_cf, smtp_port)
    inst = PostfixInstance(base, smtp_port, relay_port, which("postfix", path))
    try:
        inst.ctl("start", start_timeout_s)
        try:
            wait_smtp_banner(smtp_port, start_timeout_s)
        except PostfixBenchError as exc:
            raise PostfixBenchError(f"{exc}\n{inst.log_tail()}") from exc
        yield inst
    finally:
        stop_postfix(inst, stop_timeout_s)


def stop_postfix(inst: PostfixInstance, timeout_s: float) -> None:
    """`postfix stop`, then wait for the master's process group to empty; else SIGKILL it.

    The master is a session leader, so its group holds every Postfix daemon of
    this instance and nothing else.
    """
    pid = inst.master_pid()
    if pid is None:
        return
    with contextlib.suppress(PostfixBenchError):
        inst.ctl("stop", timeout_s)
    deadline = time.monotonic() + timeout_s
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process of group `pgid` exists.

    Zombies are skipped: the daemons' parent is gone and init reaps them on
    its own schedule, which may be slow.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited while we looked
        # After "(comm)": state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def failed_row(name: str, messages: int, note: str) -> RefRow:
    return RefRow(name, messages, math.nan, math.nan, note)


def measure_loopback_ceiling(
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    *,
    max_s: float = 120.0,
    path: str | None = None,
) -> RefRow:
    """smtp-source into smtp-sink on loopback: the SMTP ceiling, no storage."""
    port = free_ports(1)[0]
    with smtp_sink(port, path=path) as sink:
        elapsed, rate = run_source(
            port, messages, sessions, size, recipients, max_s=max_s, path=path
        )
        got = sink.received()
    note = f"{sessions} sessions, new connection per message"
    if got != messages:
        note += f"; smtp-sink counted {got}"
    return RefRow("smtp-source -> smtp-sink", messages, elapsed, rate, note)


def measure_postfix(
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    *,
    concurrency: int = 20,
    max_s: float = 120.0,
    path: str | None = None,
    tmp_root: str | None = None,
    warmup: int = 0,
    extra_main_cf: dict[str, str] | None = None,
) -> tuple[RefRow, RefRow]:
    """One run through a throwaway Postfix: (accept row, end-to-end row).

    `warmup` messages go through first, unmeasured, and the measured run
    starts at once, while Postfix still relays them: its best case (after a
    drained queue it accepted ~800-870 msg/s where it accepted ~1,350-1,370
    with the backlog still relaying, two runs each) and the state of a
    sustained load. The end-to-end row then also waits for the warm-up's
    backlog; use it from a run without a warm-up.

    Accept: smtp-source's messages / its elapsed time (every message got a
    250, each after Postfix fsynced it). End to end: messages / time from
    the start of smtp-source until smtp-sink counted all of them, waiting at
    most max_s after smtp-source finished. The queue goes in a temporary
    directory under tmp_root (default: the system's): put it on the disk
    the mqnode rows use, since fsync cost is what this row measures.
    `extra_main_cf` adds main.cf settings (a signing milter: bench/opendkim.py).
    """
    smtp_port, relay_port = free_ports(2)
    with (
        tempfile.TemporaryDirectory(prefix="bench-postfix-", dir=tmp_root) as tmp,
        smtp_sink(relay_port, path=path) as sink,
        throwaway_postfix(
            Path(tmp),
            smtp_port,
            relay_port,
            concurrency=concurrency,
            path=path,
            extra_main_cf=extra_main_cf,
        ) as inst,
    ):
        base = sink.received()  # our readiness probes are sessions, not messages
        if warmup:
            run_source(smtp_port, warmup, sessions, size, recipients, max_s=max_s, path=path)
            base += warmup  # relayed meanwhile, counted by the wait below
        t0 = time.monotonic()
        try:
            elapsed, rate = run_source(
                smtp_port, messages, sessions, size, recipients, max_s=max_s, path=path
            )
        except PostfixBenchError as exc:
            raise PostfixBenchError(f"{exc}\n{inst.log_tail(5)}") from exc
        drained = sink.wait_for(base + messages, max_s)
        e2e_s = time.monotonic() - t0
        got = sink.received() - base
        if not drained:
            tail = inst.log_tail(5)
            raise PostfixBenchError(f"smtp-sink got {got}/{messages} after {max_s:.0f}s\n{tail}")
    note = f"{sessions} sessions, fsync per queue file, relay concurrency {concurrency}"
    return (
        RefRow("Postfix accept", messages, elapsed, rate, note),
        RefRow("Postfix end to end", messages, e2e_s, messages / e2e_s, note),
    )


def reference_rows(
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    *,
    max_s: float = 120.0,
    path: str | None = None,
) -> list[RefRow]:
    """All three rows for the bench table; never raises for a missing or failing Postfix.

    A row that cannot run is returned with rate NaN and the reason in `note`
    ("skipped: ..." or "failed: ..."), so the suite's other rows still print.
    """
    names = ("smtp-source -> smtp-sink", "Postfix accept", "Postfix end to end")
    rows: list[RefRow] = []
    why = available(path, instance=False)
    if why is not None:
        rows.append(failed_row(names[0], messages, f"skipped: {why}"))
    else:
        try:
            rows.append(
                measure_loopback_ceiling(
                    messages, sessions, size, recipients, max_s=max_s, path=path
                )
            )
        except PostfixBenchError as exc:
            rows.append(failed_row(names[0], messages, f"failed: {exc}"))
    why = available(path)
    if why is not None:
        return [*rows, *(failed_row(n, messages, f"skipped: {why}") for n in names[1:])]
    try:
        rows += measure_postfix(messages, sessions, size, recipients, max_s=max_s, path=path)
    except PostfixBenchError as exc:
        rows += [failed_row(n, messages, f"failed: {exc}") for n in names[1:]]
    return rows


def table(rows: list[RefRow]) -> str:
    out = ["| row | messages | seconds | msg/s | note |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        rate = "-" if math.isnan(r.rate) else f"{r.rate:.0f}"
        secs = "-" if math.isnan(r.elapsed_s) else f"{r.elapsed_s:.2f}"
        note = r.note.replace("\n", " ").replace("|", "/")
        out.append(f"| {r.name} | {r.messages} | {secs} | {rate} | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.postfix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="payload bytes (smtp-source -l)")
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--max-s", type=float, default=120.0, help="bound per run and per drain")
    args = ap.parse_args(argv)
    rows = reference_rows(
        args.messages, args.sessions, args.size, args.recipients, max_s=args.max_s
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
