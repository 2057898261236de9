"""Checkers that join what the cluster acknowledged with what it holds.

An *ack* is one `250 ... queued as <id>` reply: (Message-ID header, queue id).
The core promise checked here: every ack is exactly one queue entry, with
that id, on every live node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .cluster import Cluster


def by_message_id(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages:
        grouped[str(m.get("message_id", ""))].append(m)
    return grouped


def assert_acked_once(
    cluster: Cluster, acked: Mapping[str, str], nodes: Sequence[int] | None = None
) -> None:
    """Every acknowledged (message_id -> queue id) is exactly one entry on each node."""
    problems: list[str] = []
    for i in cluster.live_indexes() if nodes is None else nodes:
        grouped = by_message_id(cluster.queue_messages(i))
        name = cluster.nodes[i].node_id
        for mid, qid in acked.items():
            entries = grouped.get(mid, [])
            if len(entries) != 1:
                ids = [e.get("id") for e in entries]
                problems.append(f"{name}: {mid} acked as {qid}: {len(entries)} entries {ids}")
            elif entries[0].get("id") != qid:
                problems.append(f"{name}: {mid} acked as {qid} but queued as {entries[0]['id']}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"acknowledged messages not queued exactly once:\n  {shown}{more}")


def assert_not_queued(
    cluster: Cluster, message_ids: Sequence[str], nodes: Sequence[int] | None = None
) -> None:
    """None of these Message-IDs has a queue entry on any of the nodes."""
    for i in cluster.live_indexes() if nodes is None else nodes:
        grouped = by_message_id(cluster.queue_messages(i))
        found = {mid: [e["id"] for e in grouped[mid]] for mid in message_ids if mid in grouped}
        assert not found, f"{cluster.nodes[i].node_id} queued refused messages: {found}"


def offer_ok(
    cluster: Cluster,
    i: int,
    acked: dict[str, str],
    size: int = 1024,
    sender: str = "a@client.test",
    rcpts: Sequence[str] = ("r@x.test",),
) -> None:
    """Submit one message to node i; it must be answered 250 (recorded in `acked`)."""
    from .smtp import make_message, submit

    msg = make_message(size)
    node = cluster.nodes[i]
    code, text, qid = submit("127.0.0.1", node.smtp_port, sender, list(rcpts), msg.data)
    if code != 250 or not qid:
        raise cluster.fail(f"{node.node_id} answered {code} {text!r}")
    acked[msg.message_id] = qid
