"""Command line: `mqnode run` starts a node, `mqnode status` asks one for its state.

Bad flags or config end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from dataclasses import fields
from typing import Any, NoReturn

from .config import NodeConfig
from .errors import ConfigError, MqnodeError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run a node")
    run.add_argument("--config", help="TOML file with the same keys as the flags")
    for f in fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = int if f.type == "int" else str
        run.add_argument(flag, dest=f.name, type=kind, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqnode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    st = sub.add_parser("status", help="show a node's role, Raft position and queue counts")
    st.add_argument("--admin", required=True, metavar="HOST:PORT")
    st.add_argument("--json", action="store_true")
    return parser


def _fetch(admin: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise MqnodeError(f"cannot reach admin endpoint {admin}: {exc}") from exc


def _print_status(st: dict[str, Any]) -> None:
    q = st["queue"]
    rows = [
        ("node", st["node_id"]),
        ("role", st["role"]),
        ("leader", f"{st['leader_id']} ({st['leader_raft_addr']})"),
        ("term", st["term"]),
        ("commit index", st["commit_index"]),
        ("last applied", st["last_applied"]),
        ("quorum", "yes" if st["has_quorum"] else "no"),
        ("queue", f"active {q['active']}, deferred {q['deferred']}, hold {q['hold']}"),
        ("dispatch lease", "held" if st["lease_held"] else "not held"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            st = _fetch(args.admin, "/status")
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            else:
                _print_status(st)
            return 0
        overrides = {f.name: getattr(args, f.name) for f in fields(NodeConfig)}
        cfg = NodeConfig.load(args.config, overrides)
        cfg.read_secret()
        logging.basicConfig(
            level=cfg.log_level.upper(),
            format=f"%(asctime)s {cfg.node_id} %(levelname)s %(name)s: %(message)s",
        )
        # aiosmtpd logs every SMTP command at INFO: far too much for a queue under load.
        logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.root.level))
        from .node import Node

        asyncio.run(Node(cfg).run())
        return 0
    except ConfigError as exc:
        print(f"mqnode: error: {exc}", file=sys.stderr)
        return 2
    except MqnodeError as exc:
        print(f"mqnode: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
