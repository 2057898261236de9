"""The command line's text forms of what the admin endpoint answers: status, cluster, queue."""

from __future__ import annotations

import json
import time
from typing import Any


def print_message(m: dict[str, Any]) -> None:
    when = time.strftime("%a %b %d %H:%M:%S", time.gmtime(m["received_ms"] / 1000))
    flag = {"hold": "!", "deferred": " "}.get(m["state"], "*")
    print(f"{m['id']}{flag} {m['size']:>8} {when}  {m['mail_from'] or 'MAILER-DAEMON'}")
    for r in m["recipients"]:
        if r["state"] == "pending" and r["last_reply"]:
            print(f"        ({r['last_reply']})")
        if r["state"] == "pending":
            print(f"                                         {r['address']}")


def show_text(m: dict[str, Any], now_s: float) -> str:
    """`queue show` as text: the envelope, then each recipient's state, attempts and last
    reply, and when the next attempt is due."""

    def when(ms: int | None) -> str:
        if not ms:
            return "-"
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))
        delta = ms / 1000 - now_s
        rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
        return f"{at} ({rel})"

    pending = any(r["state"] == "pending" for r in m["recipients"])
    rows = [
        ("queue id", m["id"]),
        ("state", m["state"]),
        ("from", m["mail_from"] or "<> (a bounce)"),
        ("message-id", m.get("message_id") or "-"),
        ("size", f"{m['size']} bytes"),
        ("received", f"{when(m['received_ms'])} from {m.get('client') or '?'}"),
        ("accepted by", m.get("accepted_by") or "-"),
        ("attempts", str(m.get("attempts", 0))),
        ("next attempt", when(m.get("next_attempt_ms")) if pending else "- (nothing pending)"),
    ]
    if "dkim_domains" in m:
        rows.append(("dkim", ", ".join(m["dkim_domains"]) or "not signed"))
    if "dsn" in m:  # RFC 3461, as the client gave it (decoded)
        rows.append(("dsn", json.dumps(m["dsn"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"recipients ({len(m['recipients'])}):")
    for r in m["recipients"]:
        tries = r.get("attempts", 0)
        lines.append(f"  {r['address']}  {r['state']}, {tries} attempt{'s' * (tries != 1)}")
        if r.get("last_reply"):
            lines.append(f"      last reply: {r['last_reply']}")
        if r.get("category"):
            lines.append(f"      category: {r['category']}")
    return "\n".join(lines)


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def cluster_rows(
    nodes: dict[str, dict[str, Any]], statuses: dict[str, dict[str, Any] | None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per member from each node's own /status; lag from the leader's match index.

    A status that comes back from another node than the one asked for (each
    node's admin address is loopback and this runs on another host, so the
    address reaches the local node) is not used: that row shows "unreachable"
    and a problem line says why, rather than one node's figures under
    another's name.
    """
    problems: list[str] = []
    checked: dict[str, dict[str, Any] | None] = {}
    for raft_addr, st in statuses.items():
        if st is not None and st.get("raft_addr") not in (None, raft_addr):
            admin = nodes[raft_addr]["admin_addr"]
            problems.append(
                f"{nodes[raft_addr]['node_id']}: its admin address {admin} answered as "
                f"{st.get('node_id')}; run this on that node's host, or bind --admin-addr "
                "where the other nodes can reach it"
            )
            st = None
        checked[raft_addr] = st
    leader_match: dict[str, int] = {}
    commit = 0
    for st in checked.values():
        if st and st["role"] == "leader":
            leader_match, commit = st["match_index"], st["commit_index"]
    rows = []
    for raft_addr, info in sorted(nodes.items()):
        st = checked.get(raft_addr)
        lag = ""
        if raft_addr in leader_match and not (st and st["role"] == "leader"):
            lag = str(commit - leader_match[raft_addr])
        rows.append(
            {
                "node": info["node_id"],
                "raft_addr": raft_addr,
                "role": st["role"] if st else "unreachable",
                "term": st["term"] if st else None,
                "commit_index": st["commit_index"] if st else None,
                "last_applied": st["last_applied"] if st else None,
                "lag": lag,
                "lease": bool(st and st["lease_held"]),
                # the DKIM key set's fingerprint ("" none); None: not known (unreachable, or
                # a node of an earlier release)
                "dkim": (st.get("dkim") or {}).get("key_set") if st else None,
            }
        )
    sets = {r["dkim"] for r in rows if r["dkim"] is not None}
    if len(sets) > 1:
        listing = ", ".join(
            f"{r['node']} {r['dkim'] or 'none'}" for r in rows if r["dkim"] is not None
        )
        problems.append(
            f"warning: the nodes sign with different DKIM key sets ({listing}): mail is "
            "signed by whichever node took it; give every node the same dkim_keys"
        )
    return rows, problems


def print_status(st: dict[str, Any]) -> None:
    q = st["queue"]
    rows = [
        ("node", st["node_id"]),
        ("role", st["role"]),
        ("leader", f"{st['leader_id']} ({st['leader_raft_addr']})"),
        ("term", st["term"]),
        ("commit index", st["commit_index"]),
        ("last applied", st["last_applied"]),
        ("quorum", "yes" if st["has_quorum"] else "no"),
        (
            "members",
            f"{len(st['members'])} (commit needs {st['quorum']}): " + ", ".join(st["members"]),
        ),
        ("queue", f"active {q['active']}, deferred {q['deferred']}, hold {q['hold']}"),
        ("dispatch lease", "held" if st["lease_held"] else "not held"),
        ("raft links", _links(st.get("peer_last_heard_s") or {})),
        ("smtp", _smtp_workers(st.get("smtp_workers"))),
        *(_destinations(st.get("destinations") or {}) if st["lease_held"] else []),
        *(("warning", text) for text in st.get("member_lists_disagree") or []),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _destinations(view: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for the suspended destinations and sessions per destination (lease holder)."""
    if not view:
        return []
    suspended = ", ".join(
        f"{d['destination']} ({d['for_s']} s more: {d['why']})" for d in view["suspended"]
    )
    more = view["suspended_count"] - len(view["suspended"])
    sessions = ", ".join(
        f"{d['destination']} {d['open']} open, {d['allowed']} of {d['limit']} allowed"
        for d in view["sessions"]
    )
    rows = [
        ("suspended", (suspended or "none") + (f", and {more} more" if more > 0 else "")),
        ("destinations", sessions or "no sessions open, none narrowed"),
    ]
    for site in view.get("sites") or []:  # traffic shaping (mqnode shaping show)
        state = f"{site['per_s']}/s of {site['configured_per_s'] or 'unlimited'}"
        if site["suspended_for_s"]:
            state += f"; SUSPENDED {site['suspended_for_s']} s more: {site.get('why', '')}"
        rows.append((f"site {site['site']}", state))
    return rows


def _smtp_workers(workers: dict[str, Any] | None) -> str:
    if not workers:
        return "sessions in the node's process"
    pids = ", ".join(str(p) for p in workers["pids"]) or "none"
    up = f", {workers['up']} accepting" if "up" in workers else ""  # an older node: no "up"
    return (
        f"{len(workers['pids'])} of {workers['configured']} worker processes running "
        f"(pids {pids}){up}, {workers['restarts']} restarts"
    )


def _links(heard: dict[str, float | None]) -> str:
    """Each peer with how long ago this node last heard from it (idle links send a no-op)."""
    if not heard:
        return "none (single node)"
    return ", ".join(
        f"{addr} {'not connected' if s is None else f'heard {s:.1f}s ago'}"
        for addr, s in sorted(heard.items())
    )
