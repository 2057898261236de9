"""`mqnode suppress ...`: the replicated suppression list, through any node's admin endpoint.

    mqnode suppress add bob@example.org [--scope shop.example] [--reason R] [--days N]
    mqnode suppress add @example.org              # a whole domain
    mqnode suppress remove bob@example.org [--scope shop.example]
    mqnode suppress list [--scope D] [--source manual|bounce|import] [--limit N] [--json]
    mqnode suppress show bob@example.org [--scope D]
    mqnode suppress check bob@example.org [--sender app@shop.example]
    mqnode suppress import entries.csv            # target,scope,reason,expires
    mqnode suppress export entries.csv            # every entry; "-" for stdout

CSV columns: target, scope, reason, source, created, expires (ISO 8601 UTC,
empty for never). import reads target, scope, reason and expires (header
row optional; other columns ignored) and adds them with source "import",
all or nothing per request of at most IMPORT_BATCH entries.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any, TextIO

from mqnode.cli import remote
from mqnode.errors import ConfigError, MqnodeError

IMPORT_BATCH = 2000  # entries per request: under the endpoint's 1 MiB body limit
PAGE = 5000
DAY_MS = 86_400_000
COLUMNS = ("target", "scope", "reason", "source", "created", "expires")


def add_parser(sub: Any, admin_default: str, admin_help: str, token_help: str) -> None:
    s = sub.add_parser("suppress", help="the suppression list: add, remove, list, import")
    ssub = s.add_subparsers(dest="suppress_command", required=True)
    add = ssub.add_parser("add", help="suppress addresses or @domains")
    add.add_argument("targets", nargs="+", metavar="ADDRESS|@DOMAIN")
    add.add_argument("--reason", default="", help="why (shown in the 550 reply)")
    add.add_argument("--days", type=int, default=0, help="expire after N days (0: never)")
    rm = ssub.add_parser("remove", help="take addresses or @domains off the list")
    rm.add_argument("targets", nargs="+", metavar="ADDRESS|@DOMAIN")
    ls = ssub.add_parser("list", help="entries in order")
    ls.add_argument("--source", choices=["manual", "bounce", "import"])
    ls.add_argument("--limit", type=int, default=1000)
    ls.add_argument("--json", action="store_true")
    show = ssub.add_parser("show", help="one entry")
    show.add_argument("target", metavar="ADDRESS|@DOMAIN")
    check = ssub.add_parser("check", help="would mail from SENDER to ADDRESS be refused?")
    check.add_argument("target", metavar="ADDRESS")
    check.add_argument("--sender", default="", help="the envelope sender")
    imp = ssub.add_parser("import", help="add the entries of a CSV file")
    imp.add_argument("file", help='CSV file, "-" for stdin')
    exp = ssub.add_parser("export", help="write every entry as CSV")
    exp.add_argument("file", help='CSV file, "-" for stdout')
    for name, p in ssub.choices.items():
        if name in ("add", "remove", "list", "show"):
            p.add_argument("--scope", default="", help="one sending domain (default: all)")
        p.add_argument("--admin", default=admin_default, metavar="HOST:PORT", help=admin_help)
        p.add_argument("--admin-token-file", metavar="FILE", help=token_help)


def run(args: Any) -> int:
    token = remote.token(args)

    def post(path: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        answer: dict[str, Any] = remote.request(args.admin, path, token, {"entries": entries})
        return answer

    cmd = args.suppress_command
    if cmd in ("add", "remove"):
        entries: list[dict[str, Any]] = [{"target": t, "scope": args.scope} for t in args.targets]
        if cmd == "add":
            expires = _now_ms() + args.days * DAY_MS if args.days > 0 else 0
            for e in entries:
                e.update(reason=args.reason, expires_ms=expires)
        done = post(f"/suppressions/{cmd}", entries)
        print(f"{cmd}: {done['changed']} of {done['entries']} changed the list")
        return 0
    if cmd == "list":
        query = {"limit": str(min(args.limit, PAGE))}
        if args.scope:
            query["scope"] = args.scope
        if args.source:
            query["source"] = args.source
        page = remote.request(args.admin, "/suppressions?" + urllib.parse.urlencode(query), token)
        if args.json:
            print(json.dumps(page, indent=2, sort_keys=True))
            return 0
        for e in page["entries"]:
            print(_line(e))
        print(f"{len(page['entries'])} shown of {page['total']}")
        return 0
    if cmd == "show":
        url = "/suppressions/entry?" + urllib.parse.urlencode(
            {"target": args.target, "scope": args.scope}
        )
        print(json.dumps(remote.request(args.admin, url, token), indent=2))
        return 0
    if cmd == "check":
        url = "/suppressions/check?" + urllib.parse.urlencode(
            {"rcpt": args.target, "sender": args.sender}
        )
        answer = remote.request(args.admin, url, token)
        print(_line(answer["entry"]) if answer["suppressed"] else "not suppressed")
        return 1 if answer["suppressed"] else 0
    if cmd == "import":
        total = changed = 0
        with _open(args.file, "r") as fh:
            batch: list[dict[str, Any]] = []
            for row in _read_csv(fh):
                batch.append(row)
                if len(batch) >= IMPORT_BATCH:
                    done = post("/suppressions/add", batch)
                    total, changed, batch = total + done["entries"], changed + done["changed"], []
            if batch:
                done = post("/suppressions/add", batch)
                total, changed = total + done["entries"], changed + done["changed"]
        print(f"import: {total} entries, {changed} written")
        return 0
    if cmd == "export":
        with _open(args.file, "w") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            n = 0
            for e in _every_entry(args.admin, token):
                writer.writerow(
                    [e["target"], e["scope"], e["reason"], e["source"],
                     _iso(e["created_ms"]), _iso(e["expires_ms"])]
                )  # fmt: skip
                n += 1
        print(f"export: {n} entries", file=sys.stderr)
        return 0
    raise ConfigError(f"unknown suppress command {cmd!r}")


def _every_entry(admin: str, token: str) -> Iterator[dict[str, Any]]:
    after = ""
    while True:
        query = {"limit": str(PAGE), **({"after": after} if after else {})}
        page = remote.request(admin, "/suppressions?" + urllib.parse.urlencode(query), token)
        yield from page["entries"]
        after = page.get("next", "")
        if not after:
            return


def _read_csv(fh: TextIO) -> Iterator[dict[str, Any]]:
    for n, row in enumerate(csv.reader(fh), 1):
        if not row or not row[0].strip() or (n == 1 and row[0].strip().lower() == "target"):
            continue
        cells = [*row, "", "", "", "", ""]
        target, scope, reason, expires = cells[0], cells[1], cells[2], cells[5]
        if len(row) in (3, 4):  # target,scope,reason[,expires]
            expires = cells[3]
        try:
            expires_ms = _ms(expires)
        except ValueError:
            raise MqnodeError(f"line {n}: expires {expires!r} is not an ISO 8601 time") from None
        yield {
            "target": target,
            "scope": scope,
            "reason": reason,
            "source": "import",
            "expires_ms": expires_ms,
        }


def _line(e: dict[str, Any]) -> str:
    scope = e["scope"] or "all senders"
    expires = _iso(e["expires_ms"]) or "never"
    return f"{e['target']}  ({scope})  {e['source']}, expires {expires}: {e['reason']}"


def _now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def _iso(ms: int) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ms(text: str) -> int:
    if not text.strip():
        return 0
    when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _open(path: str, mode: str) -> Any:
    if path == "-":
        return _Std(sys.stdin if mode == "r" else sys.stdout)
    try:
        return open(path, mode, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc


class _Std:
    """stdin/stdout in a `with` that does not close them."""

    def __init__(self, fh: TextIO) -> None:
        self.fh = fh

    def __enter__(self) -> TextIO:
        return self.fh

    def __exit__(self, *exc: object) -> None:
        self.fh.flush()
