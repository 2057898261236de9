"""Rolling-upgrade drill: an older release's cluster upgraded node by node under load.

    git worktree add /tmp/mqnode-old <older commit>
    python -m bench.upgrade --old-tree /tmp/mqnode-old [--messages 300]

Three nodes start on the checkout at --old-tree (run with PYTHONPATH pointing
at it: its nodes and SMTP workers import that code). Mail carrying DSN
parameters (ENVID, NOTIFY=SUCCESS) goes to every node in turn from a
bounded sender thread (every `--large-every`th message with a 300 KiB body:
chunked into entries the older release can send while it is a member, whole
in one entry once the cluster reads level 6, spool/commands.py), to a sink
on loopback that does not offer DSN, found through a dnspython server on
loopback. Meanwhile the runbook's procedure
(docs/maintenance.md, section 3) is followed: each follower is stopped with
SIGTERM and started on this tree, then leadership moves to an upgraded node
and the old leader is upgraded last.

Reported, and checked (exit 1 on a failure):
* every message answered 250 reaches the sink exactly once (by Message-ID);
* the entries the old nodes rejected, from their logs ("entry N rejected"):
  only Announce entries may be among them. An Enqueue there means an old node
  skipped mail its peers queued, and their queues diverged;
* every node ends with the same applied index and an empty queue;
* the success reports (NOTIFY=SUCCESS, "Action: relayed") that arrived: none
  is required before the last node is upgraded (the parameters wait for
  every member's reads level, raft/formats.py), and mail sent after it must get one.

Bounded: at most --messages messages, --max-s seconds per wait; the nodes are
stopped by PID and their data deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import smtplib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support.chaos import post_json
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.dnsserver import DnsServer, mx_zones
from tests.support.smtpsink import Sink, SinkHost, bind_common_port

SINKS = {"plain": "127.0.0.2", "senders": "127.0.0.3"}
SENDER = "drill@senders.test"


class MixedCluster(Cluster):
    """A Cluster whose nodes in `old` run the code at `old_tree`."""

    def __init__(self, base_dir: Path, old_tree: Path, extra_args: tuple[str, ...], dns: str):
        self.old_tree = old_tree
        self.old: set[int] = {0, 1, 2}
        super().__init__(base_dir, n=3, extra_args=extra_args, dns_server=dns)

    def command(self, i: int) -> list[str]:
        cmd = super().command(i)
        return ["env", f"PYTHONPATH={self.old_tree}", *cmd] if i in self.old else cmd


class Sender(threading.Thread):
    """Sends `count` messages, one every `every_s`, to the nodes in turn; keeps the 250s."""

    def __init__(self, c: Cluster, count: int, every_s: float, large_every: int) -> None:
        super().__init__(daemon=True)
        self.c, self.count, self.every_s = c, count, every_s
        self.large_every = large_every
        self.acked: list[tuple[str, float]] = []  # (Message-ID, when answered)
        self.refused: Counter[int] = Counter()  # reply code (-1: no connection) -> count
        self.stop = threading.Event()

    def run(self) -> None:
        for n in range(self.count):
            if self.stop.wait(self.every_s):
                return
            node = self.c.nodes[n % len(self.c.nodes)]
            mid = f"<drill{n}@senders.test>"
            body = f"From: {SENDER}\r\nMessage-ID: {mid}\r\nSubject: {n}\r\n\r\nx\r\n".encode()
            if self.large_every and n % self.large_every == 0:
                body += (b"y" * 998 + b"\r\n") * 300
            try:
                with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=15) as client:
                    client.ehlo()
                    dsn = client.has_extn("dsn")
                    client.mail(SENDER, [f"ENVID=drill{n}"] if dsn else [])
                    client.rcpt(f"r{n}@plain.test", ["NOTIFY=SUCCESS"] if dsn else [])
                    code, _ = client.data(body)
            except (OSError, smtplib.SMTPException):
                code = -1
            if code == 250:
                self.acked.append((mid, time.monotonic()))
            else:
                self.refused[code] += 1


def _wait(what: str, probe: Callable[[], bool], max_s: float) -> None:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    raise SystemExit(f"upgrade drill: timed out waiting for {what}")


def _upgrade(c: MixedCluster, i: int, max_s: float) -> None:
    c.stop_node(i)
    c.old.discard(i)
    c.start_node(i)
    _wait(f"{c.nodes[i].node_id} to catch up", lambda: _caught_up(c, i), max_s)


def _moved(c: MixedCluster) -> bool:
    """Whether an upgraded node leads; if not, ask the old leader to hand over (runbook step 4;
    "denied" while the target catches up, so the caller asks again)."""
    lead = c.leader()
    if lead not in c.old:
        return True
    target = next(x for x in range(3) if x not in c.old)
    with contextlib.suppress(OSError):  # urllib's HTTPError (409 denied) is an OSError
        post_json(c, lead, "/raft/transfer-leadership", {"to": c.nodes[target].raft_addr})
    return False


def _caught_up(c: Cluster, i: int) -> bool:
    try:
        lead = c.leader()
        return bool(c.status(i)["last_applied"] >= c.status(lead)["commit_index"] - 2)
    except Exception:
        return False


def _rejections(c: Cluster) -> list[str]:
    pattern = re.compile(r"entry \d+ rejected: (.*)")
    out: list[str] = []
    for node in c.nodes:
        text = node.log_path.read_text(encoding="utf-8", errors="replace")
        out += [f"{node.node_id}: {m.group(1)}" for m in pattern.finditer(text)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.upgrade",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--old-tree", type=Path, required=True, help="checkout of the older release")
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--every-s", type=float, default=0.05)
    ap.add_argument("--max-s", type=float, default=90.0)
    ap.add_argument("--large-every", type=int, default=10, help="0: no 300 KiB messages")
    args = ap.parse_args(argv)
    pkg = args.old_tree / "mqnode"
    if not ((pkg / "cli.py").is_file() or (pkg / "cli" / "__init__.py").is_file()):
        raise SystemExit(f"--old-tree {args.old_tree}: no mqnode checkout there")
    port, socks = bind_common_port(list(SINKS.values()))
    with (
        tempfile.TemporaryDirectory(prefix="mqnode-upgrade-") as tmp,
        DnsServer(mx_zones(SINKS)) as dns,
        SinkHost() as host,
    ):
        sinks: dict[str, Sink] = {name: host.add(name, socks[ip]) for name, ip in SINKS.items()}
        extra = (*FAST_TUNING, "--delivery-port", str(port), "--smtp-workers", "1")
        dns_addr = f"{dns.host}:{dns.port}"
        c = MixedCluster(Path(tmp), args.old_tree, extra, dns_addr)
        with c:
            sender = Sender(c, args.messages, args.every_s, args.large_every)
            sender.start()
            time.sleep(1.0)
            lead = c.leader()
            for i in (x for x in range(3) if x != lead):
                _upgrade(c, i, args.max_s)
                print(f"upgraded follower {c.nodes[i].node_id}", flush=True)
            _wait("leadership on an upgraded node", lambda: _moved(c), args.max_s)
            lead = next(iter(c.old))
            _upgrade(c, lead, args.max_s)
            upgraded_at = time.monotonic()
            print(f"upgraded the old leader {c.nodes[lead].node_id}", flush=True)
            _wait(
                "cluster_reads_level 2 or more everywhere",
                lambda: all(c.status(i).get("cluster_reads_level", 1) >= 2 for i in range(3)),
                args.max_s,
            )
            level_at = time.monotonic()
            sender.join(args.max_s)
            sender.stop.set()
            acked = dict(sender.acked)
            plain = sinks["plain"]
            _wait(
                "every acknowledged message at the sink",
                lambda: set(acked) <= {d.message_id for d in plain.delivered()},
                args.max_s,
            )
            c.wait_applied_equal(args.max_s)
            _wait(
                "empty queues",
                lambda: all(not c.queue_messages(i) for i in range(3)),
                args.max_s,
            )
            time.sleep(2.0)  # success reports ride with the outcomes; let the last ones land
            counts = Counter(d.message_id for d in plain.delivered())
            dups = {m: n for m, n in counts.items() if n > 1 and m in acked}
            reports = [d for d in sinks["senders"].delivered() if d.mail_from == ""]
            reported = {
                m.group(1) for d in reports for m in [re.search(rb"drill(\d+)", d.content)] if m
            }
            after = [m for m, t in acked.items() if t > level_at + 1.0]
            missing = [m for m in after if re.sub(r"\D", "", m).encode() not in reported]
            rejected = _rejections(c)
            bad = [r for r in rejected if not r.split(": ", 1)[1].startswith("Announce")]
    codes = sender.refused.items()
    refused = ", ".join(f"{n} x {'no connection' if k < 0 else k}" for k, n in codes)
    print(f"acknowledged {len(acked)} of {args.messages}; not: {refused or 'none'}")
    print(f"delivered {len(counts)} distinct, duplicates {len(dups)}")
    print(f"old leader upgraded at +{upgraded_at - sender.acked[0][1]:.1f} s after the first 250")
    print(
        f"success reports: {len(reports)}; acked after reads level 2: {len(after)}, "
        f"of them without a report: {len(missing)}"
    )
    print(f"entries old nodes rejected: {len(rejected)} ({len(bad)} other than Announce)")
    for r in rejected[:10]:
        print(f"  {r}")
    failed = bool(dups or bad or missing)
    print("upgrade drill: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
