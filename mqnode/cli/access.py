"""`mqnode principals` and `mqnode audit`: who may do what, and what they did.

    mqnode principals add NAME --role submit [--role view ...]
        prints the token to give the client (NAME.SECRET, shown once) on stdout and
        the entry to append to the principals file on stderr
    mqnode principals check FILE      # the file as a node would read it, one line if not
    mqnode principals reload          # the node reads its principals file again
    mqnode audit [--since 7d|2026-12-01|MS] [--principal NAME] [--json] [--limit N]

Roles and the file's format: mqnode/access/principals.py. The audit trail:
mqnode/admin/audit.py.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from typing import Any

from mqnode.access.principals import ROLES, Principals, new_principal
from mqnode.cli import remote
from mqnode.errors import ConfigError

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parsers(sub: Any, admin_default: str, admin_help: str, token_help: str) -> None:
    p = sub.add_parser("principals", help="principals and roles: add, check, reload")
    psub = p.add_subparsers(dest="principals_command", required=True)
    add = psub.add_parser("add", help="a new principal's token and file entry")
    add.add_argument("name")
    add.add_argument("--role", action="append", choices=ROLES, required=True, dest="roles")
    check = psub.add_parser("check", help="read a principals file as a node would")
    check.add_argument("file")
    reload = psub.add_parser("reload", help="the node reads its principals file again")
    reload.add_argument("--admin", default=admin_default, metavar="HOST:PORT", help=admin_help)
    reload.add_argument("--admin-token-file", metavar="FILE", help=token_help)
    a = sub.add_parser("audit", help="the audit trail: every administrative write")
    a.add_argument("--since", default="", help="7d, 12h, 2026-12-01, or epoch ms (default: all)")
    a.add_argument("--principal", default="")
    a.add_argument("--limit", type=int, default=1000)
    a.add_argument("--json", action="store_true", help="one JSON record per line")
    a.add_argument("--admin", default=admin_default, metavar="HOST:PORT", help=admin_help)
    a.add_argument("--admin-token-file", metavar="FILE", help=token_help)


def run_principals(args: Any) -> int:
    if args.principals_command == "add":
        token, entry = new_principal(args.name, sorted(set(args.roles)))
        print(token)
        print(f"# append to the principals file (mode 600):\n{entry}", file=sys.stderr)
        return 0
    if args.principals_command == "check":
        principals = Principals.load(args.file, "")
        print(f"{args.file}: {len(principals)} principals: {', '.join(principals.names())}")
        return 0
    answer = remote.request(args.admin, "/principals/reload", remote.token(args), {})
    print(f"reloaded: {answer['principals']} principals")
    return 0


def run_audit(args: Any) -> int:
    since = since_ms(args.since, time.time())
    query = f"/audit?since_ms={since}&limit={max(1, args.limit)}"
    if args.principal:
        query += f"&principal={args.principal}"
    records = remote.request(args.admin, query, remote.token(args))["records"]
    for r in records:
        if args.json:
            print(json.dumps(r, sort_keys=True))
            continue
        when = datetime.datetime.fromtimestamp(r["at_ms"] / 1000, tz=datetime.UTC)
        print(
            f"{when:%Y-%m-%d %H:%M:%S} {r['principal'] or '-'} {r['action']} "
            f"{r['target'] or '-'} (via {r['node_id']})"
        )
    return 0


def since_ms(text: str, now_s: float) -> int:
    """`--since`: "" (everything), 7d / 12h / 30m / 10s ago, a date, or epoch ms."""
    text = text.strip()
    if not text:
        return 0
    if m := _AGO.match(text):
        return int((now_s - int(m.group(1)) * _UNIT_S[m.group(2)]) * 1000)
    if text.isdigit():
        return int(text)
    try:
        day = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"--since: expected 7d, 12h, 2026-12-01 or epoch ms, not {text!r}"
        ) from exc
    if day.tzinfo is None:
        day = day.replace(tzinfo=datetime.UTC)
    return int(day.timestamp() * 1000)
