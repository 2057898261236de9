"""Roles on every route of real nodes, table-driven: each principal (submit, view,
operate, admin, and the admin token) against each endpoint, allowed or refused with 403
naming the role. The table must name every route of access/policy.py's ROUTE_ROLES (and a
node does not start with a route missing from it), so a new endpoint cannot ship without
a role and a row here. Every allowed write lands in the audit trail, which any node lists
(`mqnode audit`)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mqnode.access.policy import PUBLIC, ROUTE_ROLES, STATUS
from mqnode.access.principals import GRANTS
from tests.support.api import request, write_principals
from tests.support.cli import run_cli
from tests.support.cluster import ADMIN_TOKEN, FAST_TUNING, Cluster
from tests.support.events import read_events

pytestmark = pytest.mark.integration

MESSAGE = json.dumps({"from": "a@shop.test", "to": ["b@x.test"], "text": "hi"}).encode()
RULES = json.dumps({"text": "[default]\nmessages_per_second = 100\n"}).encode()

# (method, route) -> the requests that exercise it: (path, body); bodies are harmless
# when allowed (unknown ids, unreachable addresses).
REQUESTS: dict[tuple[str, str], list[tuple[str, bytes | None]]] = {
    ("GET", "/healthz"): [("/healthz", None)],
    ("GET", "/readyz"): [("/readyz", None)],
    ("GET", "/status"): [("/status", None)],
    ("GET", "/metrics"): [("/metrics", None)],
    ("GET", "/queue"): [("/queue", None)],
    ("GET", "/queue/{id}"): [("/queue/NOPE", None)],
    ("GET", "/queue/{id}/body"): [("/queue/NOPE/body", None)],
    ("POST", "/queue/{op}"): [
        (f"/queue/{op}", b'{"ids": ["NOPE"]}')
        for op in ("hold", "release", "retry", "delete", "bounce", "unknown")
    ],
    ("POST", "/raft/compact"): [("/raft/compact", b"{}")],
    ("POST", "/raft/transfer-leadership"): [
        ("/raft/transfer-leadership", b'{"to": "127.0.0.1:1"}')
    ],
    ("POST", "/raft/add-node"): [("/raft/add-node", b'{"addr": "127.0.0.1:1", "timeout_s": 1}')],
    ("POST", "/raft/remove-node"): [("/raft/remove-node", b'{"addr": "127.0.0.1:1"}')],
    ("POST", "/dkim/reload"): [("/dkim/reload", b"{}")],
    ("POST", "/principals/reload"): [("/principals/reload", b"{}")],
    ("POST", "/fault/partition"): [("/fault/partition", b'{"block": []}')],
    ("POST", "/fault/reset"): [("/fault/reset", b'{"peers": []}')],
    ("GET", "/suppressions"): [("/suppressions", None)],
    ("GET", "/suppressions/entry"): [("/suppressions/entry?target=x@y.test", None)],
    ("GET", "/suppressions/check"): [("/suppressions/check?recipient=x@y.test", None)],
    ("POST", "/suppressions/add"): [
        ("/suppressions/add", b'{"entries": [{"target": "gone@x.test"}]}')
    ],
    ("POST", "/suppressions/remove"): [
        ("/suppressions/remove", b'{"entries": [{"target": "gone@x.test"}]}')
    ],
    ("GET", "/shaping"): [("/shaping", None)],
    ("POST", "/shaping"): [("/shaping", RULES)],
    ("GET", "/audit"): [("/audit", None)],
    ("GET", "/v1/openapi.json"): [("/v1/openapi.json", None)],
    ("POST", "/v1/messages"): [("/v1/messages", MESSAGE)],
}


def test_the_table_names_every_route() -> None:
    assert set(REQUESTS) == set(ROUTE_ROLES)


def _needed(method: str, route: str, path: str) -> str:
    rule = ROUTE_ROLES[(method, route)]
    if isinstance(rule, dict):
        return rule.get(path.rsplit("/", 1)[1], "admin")
    return PUBLIC if rule == STATUS else rule  # public_status is on here


def test_every_role_on_every_route(tmp_path: Path) -> None:
    roles = {
        "submitter": ["submit"],
        "viewer": ["view"],
        "operator": ["operate"],
        "boss": ["admin"],
    }
    tokens = write_principals(tmp_path / "principals.toml", roles)
    tokens["admin-token"] = ADMIN_TOKEN
    granted = {name: set().union(*(GRANTS[r] for r in rs)) for name, rs in roles.items()}
    granted["admin-token"] = set(GRANTS["admin"])
    args = [
        *FAST_TUNING,
        "--principals-file",
        str(tmp_path / "principals.toml"),
        "--fault-injection",
        "--event-log",
        str(tmp_path / "events.jsonl"),
    ]
    with Cluster(tmp_path / "c", n=3, extra_args=args) as c:
        lead = c.leader()
        base = c.nodes[lead].admin_url
        allowed_writes: dict[str, int] = {}
        for (method, route), calls in sorted(REQUESTS.items()):
            for path, body in calls:
                role = _needed(method, route, path)
                for name, token in tokens.items():
                    status, text = request(base + path, method, token, body)
                    where = (name, method, path, status, text[:200])
                    assert status not in (401, 500), where
                    if role == PUBLIC or role in granted[name]:
                        assert status != 403, where
                        if method == "POST" and not path.startswith(("/v1/", "/fault/")):
                            allowed_writes[name] = allowed_writes.get(name, 0) + 1
                    else:
                        assert status == 403, where
                        assert f"lacks the role '{role}'" in text.decode(), where
                    if path.startswith("/v1/") and status >= 400:
                        assert json.loads(text)["status"] == status, where
                # Without credentials: only the public routes answer.
                status, _ = request(base + path, method, "", body)
                assert (status == 401) == (role != PUBLIC), (method, path, status)
        # Every allowed write is in the audit trail, on every node, under its principal.
        follower = c.followers()[0]

        def listed() -> tuple[list[dict[str, Any]] | None, str]:
            status, text = request(
                f"{c.nodes[follower].admin_url}/audit?limit=10000", "GET", ADMIN_TOKEN
            )
            got = json.loads(text)["records"] if status == 200 else []
            counts = {n: sum(r["principal"] == n for r in got) for n in allowed_writes}
            return (got if counts == allowed_writes else None), f"{counts} of {allowed_writes}"

        records = c.poll("every allowed write in the follower's audit trail", listed, 20)
        assert {"queue/delete", "raft/add-node", "shaping", "principals/reload"} <= {
            r["action"] for r in records if r["principal"] == "boss"
        }
        # And they are events (log and webhook) on the node that took the request.
        audited = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "audit"]
        assert len(audited) == sum(allowed_writes.values())
        assert {e["node"] for e in audited} == {c.nodes[lead].node_id}
        # The command line lists them too, from any node.
        proc = run_cli(
            "audit", "--principal", "operator", "--json",
            "--admin", c.nodes[follower].admin_addr, "--admin-token-file", str(c.admin_token_file),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        listed = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        assert len(listed) == allowed_writes["operator"]
        assert all(r["principal"] == "operator" for r in listed)


def test_principals_reload_on_sighup_all_or_nothing_and_a_bad_file_stops_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "principals.toml"
    tokens = write_principals(path, {"first": ["view"]})
    args = [*FAST_TUNING, "--principals-file", str(path)]
    with Cluster(tmp_path / "c", n=1, extra_args=args) as c:
        base = c.nodes[0].admin_url
        assert request(base + "/queue", "GET", tokens["first"])[0] == 200
        # A new principal, then SIGHUP: it is let in, the old one no longer.
        newer = write_principals(path, {"second": ["operate"]})
        proc = c.nodes[0].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGHUP)

        def switched() -> tuple[bool | None, str]:
            status = request(base + "/queue", "GET", newer["second"])[0]
            return (True if status == 200 else None), f"HTTP {status}"

        c.poll("the new principal to be let in", switched, 20)
        assert request(base + "/queue", "GET", tokens["first"])[0] == 401
        # A broken file: the reload is refused in one line, and the principals stay.
        path.write_text("[[principal]]\nname = 'x'\n", encoding="utf-8")
        os.kill(proc.pid, signal.SIGHUP)
        c.poll(
            "the refused reload to be logged",
            lambda: (
                True if "principals reload refused" in c.nodes[0].log_path.read_text() else None,
                "not yet",
            ),
            20,
        )
        assert request(base + "/queue", "GET", newer["second"])[0] == 200
        status, text = request(base + "/principals/reload", "POST", ADMIN_TOKEN, b"{}")
        assert status == 400 and b"principal 1 (x)" in text, text
        # The reload by signal is in the audit trail as the principal "signal".
        records = json.loads(request(base + "/audit", "GET", ADMIN_TOKEN)[1])["records"]
        assert any(r["principal"] == "signal" for r in records), records
    # Start-up with the broken file: exit 2, one line naming the entry.
    proc2 = run_cli(*Cluster(tmp_path / "d", n=1, extra_args=args).command(0)[3:])
    assert proc2.returncode == 2, proc2.stderr
    assert "principals_file" in proc2.stderr and len(proc2.stderr.strip().splitlines()) == 1
