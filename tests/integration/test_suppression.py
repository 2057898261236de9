"""The suppression list on real nodes: written through any node's admin endpoint (and
`mqnode suppress`), refused at RCPT TO on every node (in the node and in SMTP workers),
checked again at dispatch for mail queued before the entry, and filled by hard bounces
from a real receiver; exported and imported as CSV."""

from __future__ import annotations

import csv
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.events import read_events
from tests.support.smtp import submit
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = pytest.mark.integration

BODY = b"From: app@shop.test\r\nSubject: hi\r\n\r\nhello\r\n"
SENDER = "app@shop.test"


def _cli(c: Cluster, i: int, *args: str) -> Any:
    proc = run_cli(
        "suppress", *args, "--admin", c.nodes[i].admin_addr,
        "--admin-token-file", str(c.admin_token_file),
    )  # fmt: skip
    return proc


def _refused_everywhere(c: Cluster, rcpt: str, sender: str = SENDER) -> None:
    def probe() -> tuple[bool | None, str]:
        replies = [submit(n.host, n.smtp_port, sender, [rcpt], BODY)[:2] for n in c.nodes]
        ok = all(code == 550 and "recipient suppressed" in text for code, text in replies)
        return (True if ok else None), str(replies)

    c.poll(f"every node to refuse {rcpt}", probe, 20)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-node", "2-smtp-workers"])
def test_suppressed_recipients_are_refused_and_bounces_suppress(
    tmp_path: Path, workers: int
) -> None:
    events = tmp_path / "events.jsonl"
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        sink.script_rcpt("gone@x.test", *["550 5.1.1 <gone@x.test>: user unknown"] * 20)
        sink.script_rcpt("carol@x.test", *["450 4.2.1 slow down, please"] * 100)
        args = [
            *FAST_TUNING, "--smtp-workers", str(workers), "--event-log", str(events),
            "--retry-base-s", "1", "--retry-max-s", "2",
        ]  # fmt: skip
        with Cluster(tmp_path / "c", n=3, extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            lead = c.leader()
            other = next(i for i in range(3) if i != lead)
            # Through a follower's endpoint and the CLI; every node refuses afterwards.
            added = _cli(c, other, "add", "bob@X.test", "@blocked.test", "--reason", "asked")
            assert added.returncode == 0, added.stderr
            assert "2 of 2 changed" in added.stdout
            _refused_everywhere(c, "bob@x.test")
            _refused_everywhere(c, "anyone@blocked.test")
            code, text, _ = submit(
                c.nodes[0].host, c.nodes[0].smtp_port, SENDER, ["bob@x.test"], BODY
            )
            assert code == 550 and text.startswith("5.7.1 <bob@x.test>: recipient suppressed")
            assert "manual: asked" in text
            # A scoped entry refuses only that sender's mail.
            assert _cli(c, lead, "add", "dora@x.test", "--scope", "shop.test").returncode == 0
            _refused_everywhere(c, "dora@x.test")
            node = c.nodes[lead]
            code, _, qid = submit(
                node.host, node.smtp_port, "news@other.test", ["dora@x.test"], BODY
            )
            assert code == 250 and qid

            def outcome(qid: str, rcpt: str) -> tuple[dict[str, Any] | None, str]:
                got = [
                    e
                    for e in read_events(events)
                    if e.get("queue_id") == qid
                    and e.get("to") == rcpt
                    and e["event"] in ("delivered", "deferred", "bounced")
                ]
                return (got[-1] if got else None), "no outcome yet"

            # Queued before its entry (deferred by the receiver meanwhile): bounced at the
            # next attempt, and never given to the receiver.
            code, _, held = submit(node.host, node.smtp_port, SENDER, ["carol@x.test"], BODY)
            assert code == 250 and held
            c.poll(
                "carol's first deferral",
                lambda: (True if outcome(held, "carol@x.test")[0] else None, "not yet"),
                30,
            )
            assert _cli(c, lead, "add", "carol@x.test").returncode == 0

            def bounced_carol() -> tuple[dict[str, Any] | None, str]:
                last, _ = outcome(held, "carol@x.test")
                return (last if last and last["event"] == "bounced" else None), str(last)

            carol = c.poll("carol's bounce", bounced_carol, 30)
            assert "recipient suppressed" in carol["reply"], carol
            assert not [d for d in sink.datas if "carol@x.test" in d.rcpts]

            # A hard bounce from the receiver puts the address on the list.
            code, _, gone = submit(node.host, node.smtp_port, SENDER, ["gone@x.test"], BODY)
            assert code == 250 and gone
            bounced = c.poll("gone's bounce", lambda: outcome(gone, "gone@x.test"), 30)
            assert bounced["event"] == "bounced" and bounced["category"] == "invalid-recipient"
            added_events = [e for e in read_events(events) if e["event"] == "suppression-added"]
            assert [e["to"] for e in added_events] == ["gone@x.test"]
            _refused_everywhere(c, "gone@x.test")
            listed = _cli(c, other, "list", "--source", "bounce", "--json")
            assert listed.returncode == 0, listed.stderr
            entries = json.loads(listed.stdout)["entries"]
            assert [e["target"] for e in entries] == ["gone@x.test"]
            assert entries[0]["expires_ms"] > entries[0]["created_ms"]  # 30 days by default

            # Export, remove, import: the same entries again; then the address is taken off.
            out = tmp_path / "entries.csv"
            assert _cli(c, lead, "export", str(out)).returncode == 0
            with out.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            targets = sorted((r["scope"], r["target"]) for r in rows)
            assert targets == sorted(
                [("", "bob@x.test"), ("", "@blocked.test"), ("", "carol@x.test"),
                 ("", "gone@x.test"), ("shop.test", "dora@x.test")]
            )  # fmt: skip
            assert _cli(c, lead, "remove", "bob@x.test", "@blocked.test").returncode == 0
            imported = _cli(c, other, "import", str(out))
            assert imported.returncode == 0 and "5 entries" in imported.stdout, imported.stdout
            _refused_everywhere(c, "bob@x.test")

            def metrics() -> tuple[list[tuple[float, float]] | None, str]:
                seen = []
                for n in c.nodes:
                    with urllib.request.urlopen(n.admin_url + "/metrics", timeout=5) as r:
                        text = r.read().decode()
                    entries = re.search(r"^mqnode_suppression_entries (\S+)$", text, re.M)
                    refused = re.search(r"^mqnode_suppressed_recipients_total (\S+)$", text, re.M)
                    assert entries and refused, text[:300]
                    seen.append((float(entries.group(1)), float(refused.group(1))))
                ok = all(e == 5 and r >= 3 for e, r in seen)
                return (seen if ok else None), str(seen)

            c.poll("the suppression metrics on every node", metrics, 10)
            assert _cli(c, lead, "remove", "bob@x.test").returncode == 0

            def accepted() -> tuple[bool | None, str]:
                code, text, _ = submit(node.host, node.smtp_port, SENDER, ["bob@x.test"], BODY)
                return (True if code == 250 else None), text

            c.poll("bob to be accepted again", accepted, 20)
            checked = _cli(c, other, "check", "gone@x.test", "--sender", SENDER)
            assert checked.returncode == 1 and "gone@x.test" in checked.stdout


def test_bad_entries_are_refused_whole(tmp_path: Path) -> None:
    with Cluster(tmp_path / "c", n=3, extra_args=list(FAST_TUNING)) as c:
        bad = _cli(c, 0, "add", "ok@x.test", "not an address")
        assert bad.returncode == 1 and "entry 2" in bad.stderr, bad.stderr
        listed = _cli(c, 1, "list", "--json")
        assert json.loads(listed.stdout)["total"] == 0


def test_drop_accepts_and_sends_nothing(tmp_path: Path) -> None:
    """suppression_action = "drop": the client gets its 250, the suppressed recipient is
    dropped at dispatch with an event and no bounce; the others are delivered."""
    events = tmp_path / "events.jsonl"
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        args = [*FAST_TUNING, "--suppression-action", "drop", "--event-log", str(events)]
        with Cluster(tmp_path / "c", n=3, extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            assert _cli(c, 0, "add", "bob@x.test", "--reason", "asked").returncode == 0
            node = c.nodes[c.leader()]

            def dropped() -> tuple[str | None, str]:
                code, text, qid = submit(
                    node.host, node.smtp_port, SENDER, ["bob@x.test", "amy@x.test"], BODY
                )
                assert code == 250, text
                for _ in range(100):
                    got = {
                        e["event"]
                        for e in read_events(events)
                        if e.get("queue_id") == qid and e.get("to") == "bob@x.test"
                    }
                    if got:
                        return (qid if got == {"suppressed"} else None), str(got)
                    time.sleep(0.1)
                return None, "no outcome"

            qid = c.poll("bob dropped at dispatch", dropped, 30)
            c.poll(
                "amy delivered",
                lambda: (True if any("amy@x.test" in d.rcpts for d in sink.datas) else None, ""),
                30,
            )
            time.sleep(1)  # a bounce would be queued in the same apply, and sent at once
            assert not [d for d in sink.datas if d.mail_from in ("", "<>")], "a bounce was sent"
            assert not [d for d in sink.datas if "bob@x.test" in d.rcpts]
            assert c.queue_entry(c.leader(), qid) is None
