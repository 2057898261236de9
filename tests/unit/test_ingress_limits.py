"""RCPT-stage limits of SmtpIngress (no Raft involved: RCPT never submits)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from mqnode.clock import ManualClock
from mqnode.smtp.handler import MAX_RCPT_BYTES, SmtpIngress


class _NeverSubmits:
    async def submit(self, cmd: Any) -> Any:
        raise AssertionError("RCPT must not submit")

    def is_leader(self) -> bool:
        return True


def _ingress(max_rcpts: int = 10_000) -> SmtpIngress:
    return SmtpIngress(
        _NeverSubmits(),
        ManualClock(),
        lambda n: b"\0" * n,
        "n1",
        "test.local",
        ["127.0.0.0/8"],
        max_rcpts,
        lambda: 0.0,
    )


def _session(ip: str) -> Session:
    s = Session(asyncio.new_event_loop())
    s.peer = (ip, 40000)
    return s


def test_envelope_bytes_are_bounded_so_the_entry_stays_small() -> None:
    ing = _ingress()
    session, env = _session("127.0.0.1"), Envelope()
    replies = []
    for i in range(600):
        addr = f"recipient-number-{i:04d}-with-a-long-local-part@example.org"
        replies.append(asyncio.run(ing.handle_RCPT(None, session, env, addr, [])))  # type: ignore[arg-type]
    assert replies[0].startswith("250")
    assert any(r.startswith("452 4.5.3") for r in replies)
    assert sum(len(r) + 3 for r in env.rcpt_tos) <= MAX_RCPT_BYTES
    session.loop.close()


def test_clients_outside_allowed_networks_are_refused() -> None:
    ing = _ingress()
    session, env = _session("192.0.2.7"), Envelope()
    reply = asyncio.run(ing.handle_MAIL(None, session, env, "a@example.com", []))  # type: ignore[arg-type]
    assert reply.startswith("554 5.7.1")
    session.loop.close()


def test_recipient_count_limit() -> None:
    ing = _ingress(max_rcpts=2)
    session, env = _session("127.0.0.1"), Envelope()
    codes = [
        asyncio.run(ing.handle_RCPT(None, session, env, f"u{i}@example.org", []))[:3]  # type: ignore[arg-type]
        for i in range(3)
    ]
    assert codes == ["250", "250", "452"]
    session.loop.close()
