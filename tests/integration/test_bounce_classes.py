"""Bounce categories on real nodes: a receiver refusing with the large providers' texts,
each deferred or bounced recipient's category in the event log, the metrics and
`queue show`; an operator's rules file read first, and re-read on SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.events import OUTCOMES, read_events
from tests.support.smtp import submit
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = pytest.mark.integration

REFUSALS = {
    "gone@x.test": (
        "550 5.1.1 The email account that you tried to reach does not exist.",
        "bounced",
        "invalid-recipient",
    ),
    "full@x.test": (
        "452 4.2.2 The recipient's inbox is out of storage space.",
        "deferred",
        "mailbox-full",
    ),
    "slow@x.test": (
        "450 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
        "deferred",
        "rate-limited",
    ),
    "zork@x.test": ("554 5.7.1 zork says no", "bounced", "content"),  # the operator's rule
}


def test_refusals_carry_their_category(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\ncategory = "content"\nreply = "zork"\n')
    events = tmp_path / "events.jsonl"
    port, socks = bind_common_port(["127.0.0.1"])
    with SinkHost() as host:
        sink = host.add("receiver", socks["127.0.0.1"])
        for rcpt, (reply, _, _) in REFUSALS.items():
            sink.script_rcpt(rcpt, *[reply] * 50)
        args = [
            *FAST_TUNING, "--retry-base-s", "600", "--retry-max-s", "600",
            "--bounce-rules-file", str(rules), "--event-log", str(events),
        ]  # fmt: skip
        with Cluster(tmp_path / "c", n=3, extra_args=args, relay_host=f"127.0.0.1:{port}") as c:
            lead = c.leader()
            node = c.nodes[lead]
            body = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"
            code, text, qid = submit(
                node.host, node.smtp_port, "a@sender.test", [*REFUSALS, "ok@x.test"], body
            )
            assert code == 250 and qid, text

            def classified() -> tuple[dict[str, dict[str, Any]] | None, str]:
                got = {
                    e["to"]: e
                    for e in read_events(events)
                    if e.get("queue_id") == qid and e["event"] in OUTCOMES
                }
                return (got if len(got) == len(REFUSALS) + 1 else None), f"{sorted(got)}"

            got = c.poll("an outcome event for each recipient", classified, 60)
            assert "category" not in got["ok@x.test"]
            for rcpt, (_, outcome, category) in REFUSALS.items():
                assert got[rcpt]["event"] == outcome and got[rcpt]["category"] == category, got[
                    rcpt
                ]

            with urllib.request.urlopen(c.nodes[lead].admin_url + "/metrics", timeout=5) as r:
                metrics = r.read().decode()
            for _, outcome, category in REFUSALS.values():
                found = re.search(
                    rf'^mqnode_delivery_failures_total\{{category="{category}",'
                    rf'outcome="{outcome}",site="default"\}} (\S+)$',
                    metrics,
                    re.M,
                )
                assert found and float(found.group(1)) >= 1, (category, outcome)

            shown = run_cli(
                "queue", "show", qid, "--admin", c.nodes[lead].admin_addr,
                "--admin-token-file", str(c.admin_token_file),
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            for rcpt in ("full@x.test", "slow@x.test"):  # still pending: their last reply's
                after = shown.stdout.split(f"  {rcpt}  ", 1)[1].split("\n  ")[0:3]
                assert f"category: {REFUSALS[rcpt][2]}" in "\n".join(after), shown.stdout

            # Another rule for the same text, and SIGHUP: the next refusals follow it.
            rules.write_text('[[rule]]\ncategory = "policy"\nreply = "zork"\n')
            proc = c.nodes[lead].proc
            assert proc is not None
            os.kill(proc.pid, signal.SIGHUP)
            c.poll(
                "the rules to be re-read",
                lambda: (
                    True
                    if "bounce rules: reloaded" in c.nodes[lead].log_path.read_text()
                    else None,
                    "not yet",
                ),
                20,
            )
            code, text, again = submit(
                node.host, node.smtp_port, "a@sender.test", ["zork@x.test"], body
            )
            assert code == 250 and again, text

            def reclassified() -> tuple[str | None, str]:
                mine = [
                    e
                    for e in read_events(events)
                    if e.get("queue_id") == again and e["event"] in OUTCOMES
                ]
                return (mine[0]["category"] if mine else None), "no event yet"

            assert c.poll("the refusal under the new rule", reclassified, 60) == "policy"
