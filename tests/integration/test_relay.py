"""Relay-host delivery through a real sink: steady state is exactly once, sessions are reused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from mqnode.devtools.devsink import read_sink
from tests.support.cluster import FAST_TUNING, Cluster, free_ports
from tests.support.smtp import make_message, submit
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = pytest.mark.integration


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        _Hook.received.extend(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def relay_cluster(tmp_path: Path, webhook: str) -> Iterator[tuple[Cluster, Path]]:
    port = free_ports(1)[0]
    out = tmp_path / "sink.jsonl"
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mqnode.devtools.devsink",
            "--listen",
            f"127.0.0.1:{port}",
            "--out",
            str(out),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        events = tmp_path / "events.jsonl"
        args = (
            *FAST_TUNING,
            *("--delivery-concurrency", "4", "--event-log", str(events)),
            *("--event-webhook", webhook),
        )
        with Cluster(tmp_path / "c", extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            yield c, out
    finally:
        sink.terminate()
        sink.wait(timeout=10)


def _wait_delivered(c: Cluster, out: Path, ids: set[str], timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = read_sink(out)
        queued = sum(sum(c.status(i)["queue"].values()) for i in c.live_indexes())
        if ids <= {r["message_id"] for r in records} and queued == 0:
            return records
        time.sleep(0.2)
    raise AssertionError(f"not delivered in {timeout_s}s: {len(records)} records, want {len(ids)}")


def test_steady_state_delivers_each_message_once_over_reused_sessions(
    relay_cluster: tuple[Cluster, Path],
) -> None:
    c, out = relay_cluster
    sent: dict[str, str] = {}
    for k in range(30):
        msg = make_message(1024)
        code, text, qid = submit(
            "127.0.0.1",
            c.nodes[k % 3].smtp_port,
            "alice@client.test",
            ["bob@example.test"],
            msg.data,
        )
        assert code == 250, (code, text)
        sent[msg.message_id] = str(qid)
    records = _wait_delivered(c, out, set(sent))
    counts = Counter(r["message_id"] for r in records)
    assert all(counts[m] == 1 for m in sent), f"duplicates in steady state: {counts.most_common(3)}"
    sessions = {r["peer"] for r in records}
    assert len(sessions) < len(sent), f"every message opened its own session ({len(sessions)})"
    leaders = [i for i in c.live_indexes() if c.status(i)["lease_held"]]
    assert len(leaders) == 1 and leaders[0] == c.leader(), leaders


def test_event_log_follows_each_message(relay_cluster: tuple[Cluster, Path]) -> None:
    c, out = relay_cluster
    msg = make_message(800)
    code, text, qid = submit(
        "127.0.0.1", c.nodes[1].smtp_port, "alice@client.test", ["bob@x.test"], msg.data
    )
    assert code == 250, (code, text)
    _wait_delivered(c, out, {msg.message_id})
    log = out.parent / "events.jsonl"
    deadline = time.monotonic() + 10
    kinds: list[str] = []
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        kinds = [e["event"] for e in lines if e["queue_id"] == qid]
        if "delivered" in kinds:
            break
        time.sleep(0.2)
    assert kinds[:2] == ["received", "committed"], kinds
    assert "claimed" in kinds and "delivered" in kinds, kinds
    delivered = [e for e in lines if e["queue_id"] == qid and e["event"] == "delivered"]
    assert delivered[0]["to"] == "bob@x.test" and delivered[0]["reply"].startswith("250")

    deadline = time.monotonic() + 20
    hooked: list[str] = []
    while time.monotonic() < deadline:
        hooked = [str(e["event"]) for e in _Hook.received if e["queue_id"] == qid]
        if "delivered" in hooked:
            break
        time.sleep(0.2)
    assert "committed" in hooked and "delivered" in hooked, hooked


def test_the_relay_host_is_one_destination_for_every_recipient_domain(tmp_path: Path) -> None:
    """With a relay host, `per_destination_concurrency` bounds the transactions open at the
    relay whatever the recipient domains (Postfix counts its relayhost as one nexthop), and
    a message for several domains reaches the relay once, with all its recipients. (Per
    domain, measured on the old code: 5 transactions open at once at the relay, up to 8
    possible, and each of the 3 messages for two domains went twice.)"""
    per_destination = 2
    with SinkHost() as host:
        _, socks = bind_common_port(["127.0.0.1"])
        sink = host.add("relay", socks["127.0.0.1"], reply_delay_s=0.3)
        args = (
            *FAST_TUNING,
            *("--delivery-concurrency", "8"),
            *("--per-destination-concurrency", str(per_destination)),
        )
        relay = f"127.0.0.1:{sink.address[1]}"
        with Cluster(tmp_path / "c", extra_args=args, relay_host=relay) as c:
            lead = c.leader()
            sent: dict[str, tuple[str, ...]] = {}
            for k in range(12):
                rcpts = (f"u{k}@d{k % 4}.test",)
                if k % 3 == 0:
                    rcpts += (f"v{k}@d{(k + 1) % 4}.test",)
                msg = make_message(1024, rcpt=rcpts[0])
                code, text, _ = submit(
                    "127.0.0.1", c.nodes[lead].smtp_port, "a@client.test", list(rcpts), msg.data
                )
                assert code == 250, (code, text)
                sent[msg.message_id] = rcpts

            def arrived() -> tuple[bool | None, str]:
                got = {d.message_id for d in sink.delivered()}
                missing = set(sent) - got
                return (True if not missing else None), f"{len(missing)} not at the relay"

            c.poll("every message at the relay", arrived, 60.0)
    copies = Counter(d.message_id for d in sink.delivered())
    assert all(copies[m] == 1 for m in sent), copies
    assert {d.message_id: d.rcpts for d in sink.delivered()} == sent
    assert 1 <= sink.most_in_progress <= per_destination, sink.most_in_progress


def test_a_node_that_relays_to_itself_ends_the_loop(tmp_path: Path) -> None:
    """A relay host that is the node itself (a mail loop): each pass adds a Received
    field, and at `hopcount_limit` the node refuses the message (554 5.4.6); it bounces,
    the bounce (null sender) loops the same way until it is refused and dropped (a
    bounce is never bounced), and nothing is left queued."""
    c = Cluster(tmp_path, n=1, extra_args=(*FAST_TUNING, "--hopcount-limit", "8"))
    node = c.nodes[0]
    c.relay_host = f"127.0.0.1:{node.smtp_port}"
    with c:
        msg = make_message(300)
        code, text, _ = submit("127.0.0.1", node.smtp_port, "a@c.test", ["r@x.test"], msg.data)
        assert code == 250, text

        def drained() -> tuple[bool | None, str]:
            left = c.queue_messages(0)
            return (True if not left else None), f"{len(left)} queued"

        c.poll("the loop to end", drained, 60.0)
        log = node.log_path.read_text()
    refusals = [line for line in log.splitlines() if "refused message" in line]
    assert len(refusals) == 2 and all("too many hops" in r for r in refusals), log[-3000:]
