"""The main job on an embedded default: a local 3-node cluster on loopback.

    python -m mqnode.devtools.demo [--messages N] [--keep DIR]

Starts a recording SMTP sink and three `mqnode run` processes on free
127.0.0.1 ports (relaying to the sink), submits mail to every node, shows each
250 and its arrival at the sink, kills the leader with SIGKILL, shows a new
leader taking over, submits more, and checks nothing acknowledged was lost.
Every process it starts is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqnode.devtools.devsink import read_sink
from mqnode.devtools.localports import free_loopback_ports

WAIT_S = 30.0


@dataclass
class DemoNode:
    node_id: str
    raft: str
    smtp: int
    admin: int
    proc: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.admin}/status"
            with urllib.request.urlopen(url, timeout=2) as r:
                data: dict[str, Any] = json.loads(r.read())
                return data
        except OSError:
            return None


def wait_for(what: str, check: Any, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out after {timeout_s:.0f}s waiting for {what}")


def submit(node: DemoNode, n: int) -> tuple[str, str]:
    msg_id = f"<demo-{n}-{time.time_ns()}@mqnode.devtools.demo>"
    body = (
        f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: demo message {n}\r\n"
        f"Message-ID: {msg_id}\r\n\r\nHello from the mqnode demo, message {n}.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", node.smtp, timeout=30) as s:
        s.ehlo("demo.client")
        s.mail("alice@example.com")
        s.rcpt("bob@example.org")
        code, text = s.data(body.encode())
    reply = f"{code} {text.decode()}"
    print(f"  -> {node.node_id}: {reply}")
    if code != 250:
        raise SystemExit(f"demo: {node.node_id} refused message {n}: {reply}")
    return msg_id, text.decode().rsplit(" ", 1)[-1]


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.secret = workdir / "cluster.secret"
        self.secret.write_text(os.urandom(24).hex())
        self.secret.chmod(0o600)
        ports = free_loopback_ports(10)
        self.sink_port = ports.pop()
        self.sink_file = workdir / "sink.jsonl"
        self.sink: subprocess.Popen[bytes] | None = None
        self.nodes = [
            DemoNode(f"n{i}", f"127.0.0.1:{ports.pop()}", ports.pop(), ports.pop())
            for i in (1, 2, 3)
        ]

    def start(self) -> None:
        py = sys.executable
        self.sink = subprocess.Popen(
            [
                py,
                "-m",
                "mqnode.devtools.devsink",
                "--listen",
                f"127.0.0.1:{self.sink_port}",
                "--out",
                str(self.sink_file),
            ],
            stderr=open(self.dir / "sink.log", "wb"),  # noqa: SIM115
        )
        for node in self.nodes:
            self.start_node(node)

    def start_node(self, node: DemoNode) -> None:
        peers = ",".join(n.raft for n in self.nodes if n is not node)
        node.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mqnode.cli",
                "run",
                "--node-id",
                node.node_id,
                "--data-dir",
                str(self.dir / node.node_id),
                "--raft-addr",
                node.raft,
                "--peers",
                peers,
                "--smtp-addr",
                f"127.0.0.1:{node.smtp}",
                "--admin-addr",
                f"127.0.0.1:{node.admin}",
                "--cluster-secret-file",
                str(self.secret),
                "--relay-host",
                f"127.0.0.1:{self.sink_port}",
                "--election-timeout-min-ms",
                "300",
                "--election-timeout-max-ms",
                "700",
                "--heartbeat-ms",
                "60",
                "--retry-base-s",
                "2",
            ],
            stderr=open(self.dir / f"{node.node_id}.log", "ab"),  # noqa: SIM115
        )

    def stop(self) -> None:
        procs = [n.proc for n in self.nodes if n.proc] + ([self.sink] if self.sink else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def leader(self) -> DemoNode | None:
        for node in self.nodes:
            st = node.status() if node.proc and node.proc.poll() is None else None
            if st and st["role"] == "leader" and st["has_quorum"]:
                return node
        return None

    def wait_delivered(self, msg_ids: list[str]) -> None:
        def done() -> bool:
            seen = {r["message_id"] for r in read_sink(self.sink_file)}
            live = [n.status() for n in self.nodes if n.proc and n.proc.poll() is None]
            empty = all(s and sum(s["queue"].values()) == 0 for s in live)
            return set(msg_ids) <= seen and empty

        wait_for("delivery to the sink and an empty queue", done)

    def show_table(self) -> None:
        print(f"  {'node':<5} {'role':<9} {'term':>4} {'applied':>7}  queue")
        for node in self.nodes:
            st = node.status() if node.proc and node.proc.poll() is None else None
            if st is None:
                print(f"  {node.node_id:<5} (down)")
                continue
            q = st["queue"]
            print(
                f"  {node.node_id:<5} {st['role']:<9} {st['term']:>4} {st['last_applied']:>7}"
                f"  active={q['active']} deferred={q['deferred']} hold={q['hold']}"
            )


def run(n_messages: int, workdir: Path) -> int:
    demo = Demo(workdir)
    print(f"mqnode demo: 3 nodes + a recording sink on 127.0.0.1 (data in {workdir})")
    try:
        demo.start()
        leader = wait_for("a leader", demo.leader)
        print(
            f"\nleader elected: {leader.node_id}; submitting {n_messages} messages "
            "round-robin to every node:"
        )
        sent = [submit(demo.nodes[i % 3], i) for i in range(n_messages)]
        demo.wait_delivered([m for m, _ in sent])
        print("\nall delivered to the sink, queues empty on every node:")
        demo.show_table()

        print(f"\nkill -9 the leader ({leader.node_id}) ...")
        assert leader.proc is not None
        leader.proc.kill()
        leader.proc.wait()
        t0 = time.monotonic()
        new = wait_for("a new leader", demo.leader)
        print(f"new leader {new.node_id} after {time.monotonic() - t0:.2f}s; submitting 3 more:")
        survivors = [n for n in demo.nodes if n is not leader]
        more = [submit(survivors[i % 2], n_messages + i) for i in range(3)]
        demo.wait_delivered([m for m, _ in more])
        print(f"\nrestarting {leader.node_id}; it catches up from the log:")
        demo.start_node(leader)
        wait_for(
            f"{leader.node_id} to catch up",
            lambda: (
                (leader.status() or {}).get("last_applied", -1)
                >= (new.status() or {}).get("last_applied", 0)
            ),
        )
        demo.show_table()

        records = read_sink(demo.sink_file)
        acked = {m for m, _ in sent + more}
        arrived = [r["message_id"] for r in records if r["message_id"] in acked]
        lost = acked - set(arrived)
        dups = len(arrived) - len(set(arrived))
        print(
            f"\nsink: {len(records)} messages; acknowledged {len(acked)}, lost {len(lost)}, "
            f"duplicates {dups}"
        )
        for rec in records:
            print(f"  {rec['message_id']}  {rec['size']:>5} bytes  to {','.join(rec['rcpts'])}")
        return 1 if lost else 0
    finally:
        demo.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mqnode.devtools.demo", description=__doc__)
    ap.add_argument("--messages", type=int, default=6)
    ap.add_argument("--keep", metavar="DIR", help="keep data and logs in DIR")
    args = ap.parse_args(argv)
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        return run(args.messages, workdir)
    tmp = Path(tempfile.mkdtemp(prefix="mqnode-demo-"))
    try:
        return run(args.messages, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
