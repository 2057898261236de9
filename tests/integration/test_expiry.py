"""A deferral older than max_queue_lifetime_s becomes a bounce (4.4.7) with a DSN to the sender."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import pytest

from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.smtp import make_message, submit
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = pytest.mark.integration


def test_expired_deferral_bounces_with_4_4_7(tmp_path: Path) -> None:
    port, socks = bind_common_port(["127.0.0.2"])
    with SinkHost() as host:
        relay = host.add("relay", socks["127.0.0.2"])
        relay.script_rcpt("slow@far.test", "451 4.4.1 try later")
        args = (
            *FAST_TUNING,
            *("--max-queue-lifetime-s", "2", "--retry-base-s", "1", "--retry-max-s", "1"),
        )
        with Cluster(tmp_path, extra_args=args, relay_host=f"127.0.0.2:{port}") as c:
            msg = make_message(600, mail_from="alice@client.test", rcpt="slow@far.test")
            code, text, qid = submit(
                "127.0.0.1", c.nodes[0].smtp_port, "alice@client.test", ["slow@far.test"], msg.data
            )
            assert code == 250, (code, text)
            deadline = time.monotonic() + 60
            bounces = []
            while time.monotonic() < deadline and not bounces:
                bounces = [d for d in relay.datas if d.mail_from == "" and d.accepted]
                time.sleep(0.2)
            assert bounces, f"no bounce after expiry; rcpts seen: {relay.rcpts[-3:]}"
            c.wait_applied_equal(20)
            assert all(c.queue_entry(i, str(qid)) is None for i in c.live_indexes())
    bounce = bounces[0]
    assert bounce.rcpts == ("alice@client.test",)
    parsed = email.message_from_bytes(bounce.content, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    status = bounce.content.decode(errors="replace")
    assert "Status: 4.4.7" in status and "slow@far.test" in status, status[:2000]
    assert len(bounces) == 1
