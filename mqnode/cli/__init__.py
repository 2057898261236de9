"""Command line: `mqnode run` starts a node, `mqnode status` asks one for its state,
`mqnode queue ...` lists and operates the queue through any node's admin endpoint,
`mqnode cluster ...` shows every node and changes leadership and membership.

Bad flags or config (a malformed address included) end with one line on stderr
and exit code 2; a request the node refuses or cannot answer (not the leader,
another membership change pending, unreachable) with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from mqnode import logsetup
from mqnode.cli import access, bounces, dkim, remote, shaping, suppress
from mqnode.cli import text as views
from mqnode.config import NodeConfig
from mqnode.errors import ConfigError, MembershipError, MqnodeError
from mqnode.eventloop import run_event_loop
from mqnode.raft.membership_rules import check_addr

SENDER_HELP = 'from this envelope sender; "<>" for bounces (the null sender)'
DEFAULT_ADMIN = "127.0.0.1:8025"
OPERATION_TIMEOUT_S = 3600.0  # a queue operation on a selection (every match, any count)
LIST_TIMEOUT_S = 300.0
ADMIN_HELP = f"the node's admin endpoint (default: {DEFAULT_ADMIN})"
TOKEN_HELP = (
    "file with that node's admin token or a principal's NAME.SECRET (default: $MQNODE_ADMIN_TOKEN)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a node",
        description="Run one node. Every setting is a flag here and a key in the --config "
        "TOML file (--raft-addr is raft_addr); flags win. Lists are comma-separated; "
        "switches take --x or --no-x.",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the same keys as the flags")
    _add_setting_flags(run)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per NodeConfig field, with its help and default (argparse's stays None,
    so that a flag left out does not override the TOML file)."""
    defaults = NodeConfig()
    for f in fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {'on' if default else 'off'})",
            )
            continue
        shown = ",".join(default) if isinstance(default, list) else str(default)
        repeat_as = f.metadata.get("repeat_as")
        if repeat_as:  # repeatable; each may hold a comma-separated list too
            parser.add_argument(
                flag,
                repeat_as,
                dest=f.name,
                action="append",
                default=None,
                metavar=f.metadata.get("metavar") or "LIST",
                help=f"{text} (default: {shown or 'none'})",
            )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=int if isinstance(default, int) else str,
            default=None,
            metavar=f.metadata.get("metavar") or _metavar(f.name, default),
            help=text if "(required" in text else f"{text} (default: {shown or 'none'})",
        )


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given); a repeated list flag is one list."""
    out: dict[str, Any] = {}
    for f in fields(NodeConfig):
        value = getattr(args, f.name)
        out[f.name] = ",".join(value) if isinstance(value, list) else value
    return out


def _metavar(name: str, default: Any) -> str:
    if isinstance(default, int):
        return "N"
    return "HOST:PORT" if name.endswith(("_addr", "_host", "_server")) else "TEXT"


def _switch_names() -> set[str]:
    return {f.name for f in fields(NodeConfig) if isinstance(getattr(NodeConfig(), f.name), bool)}


_BOOL_WORDS = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True}


def switches_as_flags(argv: list[str]) -> list[str]:
    """`--x 1` / `--x 0` (and true/false, `--x=0`), the form of earlier releases and of TOML
    habits, as `--x` / `--no-x`."""
    names = {"--" + n.replace("_", "-") for n in _switch_names()}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in names and eq and value.lower() in _BOOL_WORDS:
            out.append(flag if _BOOL_WORDS[value.lower()] else "--no-" + flag[2:])
        elif arg in names and i + 1 < len(argv) and argv[i + 1].lower() in _BOOL_WORDS:
            out.append(arg if _BOOL_WORDS[argv[i + 1].lower()] else "--no-" + arg[2:])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _add_restore(sub: Any) -> None:
    r = sub.add_parser(
        "restore",
        help="disaster recovery: build this node's data dir from a snapshot.bin (one-node cluster)",
    )
    r.add_argument(
        "--snapshot", required=True, metavar="FILE", help="a copy of DATA_DIR/snapshot.bin"
    )
    r.add_argument("--config", help="the node's TOML file (data_dir, raft_addr, map sizes)")
    _add_setting_flags(r)


def _restore(args: argparse.Namespace) -> int:
    from mqnode.restore import restore_data_dir

    overrides = setting_overrides(args)
    cfg = NodeConfig.load(args.config, overrides)
    header = restore_data_dir(
        Path(args.snapshot),
        cfg.data_path,
        cfg.raft_addr,
        cfg.state_map_size_mb,
        cfg.raft_map_size_mb,
    )
    print(
        f"restored {cfg.data_path} from {args.snapshot} (index {header.index}); start this node "
        "with no peers, then add the others with `mqnode cluster add-node` (they run with --join)"
    )
    return 0


def _add_queue(sub: Any) -> None:
    q = sub.add_parser("queue", help="inspect and operate the queue (postqueue/postsuper)")
    qsub = q.add_subparsers(dest="queue_command", required=True, parser_class=_Parser)
    ls = qsub.add_parser("list", help="list messages (postqueue -p)")
    ls.add_argument("--state", choices=["active", "deferred", "hold"])
    ls.add_argument("--domain", help="with a recipient in this domain")
    ls.add_argument("--sender", help=SENDER_HELP)
    ls.add_argument("--limit", type=int, default=1000)
    ls.add_argument("--json", action="store_true")
    show = qsub.add_parser("show", help="one message: envelope and per-recipient status")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    cat = qsub.add_parser("cat", help="the stored message as it will be sent (postcat -q)")
    cat.add_argument("id")
    cat.add_argument("--headers", action="store_true", help="the header only (postcat -h)")
    for op, text in (
        ("hold", "put messages on hold (postsuper -h)"),
        ("release", "release held messages (postsuper -H)"),
        ("delete", "delete messages (postsuper -d)"),
        ("retry", "attempt delivery now (postqueue -i)"),
        ("bounce", "return to sender with a DSN"),
    ):
        p = qsub.add_parser(op, help=text)
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every message matching the filters")
        p.add_argument("--state", choices=["active", "deferred", "hold"])
        p.add_argument("--domain", help="with a recipient in this domain")
        p.add_argument("--sender", help=SENDER_HELP)
    flush = qsub.add_parser("flush", help="retry every deferred message (postqueue -f)")
    flush.add_argument("--domain", help="with a recipient in this domain")
    flush.add_argument("--sender", help=SENDER_HELP)
    for p in qsub.choices.values():
        p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT", help=ADMIN_HELP)
        p.add_argument(
            "--admin-token-file",
            metavar="FILE",
            help=TOKEN_HELP,
        )


def _add_cluster(sub: Any) -> None:
    c = sub.add_parser("cluster", help="the whole cluster: every node's state, leadership")
    csub = c.add_subparsers(dest="cluster_command", required=True, parser_class=_Parser)
    st = csub.add_parser("status", help="every node: role, term, indexes, lag, lease")
    st.add_argument("--json", action="store_true")
    tr = csub.add_parser("transfer-leadership", help="hand leadership to a caught-up follower")
    tr.add_argument("--to", metavar="RAFT_HOST:PORT", help="target (default: most caught up)")
    for name, text in (
        ("add-node", "add a started node (run with join = true) as a member; ask the leader"),
        ("remove-node", "remove a member (then stop its process); ask the leader"),
    ):
        m = csub.add_parser(name, help=text)
        m.add_argument("addr", metavar="RAFT_HOST:PORT", help="the node's raft_addr")
        m.add_argument(
            "--timeout-s", type=float, default=10.0, help="wait this long for the commit"
        )
    for p in csub.choices.values():
        p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT", help=ADMIN_HELP)
        p.add_argument("--admin-token-file", metavar="FILE", help=TOKEN_HELP)


def _change_membership(args: argparse.Namespace) -> int:
    """add-node / remove-node against the node at --admin, which must be the leader.

    Not forwarded (unlike transfer-leadership): the operator names the node that
    decides, and a follower's refusal says which node leads.
    """
    try:
        addr = check_addr(args.addr)
    except MembershipError as exc:
        raise ConfigError(f"{args.cluster_command}: {exc}") from exc
    if not 0 < args.timeout_s <= 120:
        raise ConfigError("--timeout-s: a number of seconds in (0, 120]")
    body = {"addr": addr, "timeout_s": args.timeout_s}
    path = f"/raft/{args.cluster_command}"
    result = remote.request(
        args.admin, path, remote.token(args), body, timeout_s=args.timeout_s + 10
    )
    done = "added" if result["op"] == "add" else "removed"
    members = result["members"]
    print(
        f"{done} {result['addr']}: {len(members)} members, quorum {result['quorum']}: "
        + ", ".join(members)
    )
    return 0


def _cluster(args: argparse.Namespace) -> int:
    if args.cluster_command in ("add-node", "remove-node"):
        return _change_membership(args)
    if args.cluster_command == "transfer-leadership":
        first = remote.fetch(args.admin, "/status")
        leader = first["nodes"].get(first.get("leader_raft_addr") or "", {})
        admin = args.admin if first["role"] == "leader" else leader.get("admin_addr")
        if not admin:
            raise MqnodeError("no leader known; nothing to transfer")
        body = {"to": args.to} if args.to else {}
        result = remote.request(admin, "/raft/transfer-leadership", remote.token(args), body)
        print(
            f"transfer requested from {first.get('leader_id')} to {args.to or 'best follower'}"
            f": {result['result']}"
        )
        return 0
    first = remote.fetch(args.admin, "/status")
    # Nodes that ever announced themselves, less the ones removed since.
    members = first["members"]
    nodes = {a: info for a, info in first["nodes"].items() if a in members}
    statuses: dict[str, dict[str, Any] | None] = {}
    for raft_addr, info in sorted(nodes.items()):
        try:
            statuses[raft_addr] = remote.fetch(info["admin_addr"], "/status")
        except MqnodeError:
            statuses[raft_addr] = None
    rows, problems = views.cluster_rows(nodes, statuses)
    said = [first, *(st for st in statuses.values() if st)]
    warnings = dict.fromkeys(w for st in said for w in st.get("member_lists_disagree") or [])
    problems += [f"warning: {text}" for text in warnings]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'node':<8} {'raft':<22} {'role':<11} {'term':>5} {'commit':>8} {'applied':>8} "
        f"{'lag':>5}  {'lease':<5}  dkim"
    )
    for r in rows:
        print(
            f"{r['node']:<8} {r['raft_addr']:<22} {r['role']:<11} {r['term'] or '':>5} "
            f"{r['commit_index'] or '':>8} {r['last_applied'] or '':>8} {r['lag']:>5}  "
            f"{'held' if r['lease'] else '':<5}  {r['dkim'] or ''}"
        )
    for problem in problems:
        print(problem)
    quiet = sorted(set(members) - set(nodes))
    print(f"{len(members)} members, commit needs {first['quorum']}", end="")
    print(f"; not announced yet: {', '.join(quiet)}" if quiet else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqnode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_restore(sub)
    st = sub.add_parser("status", help="show a node's role, Raft position and queue counts")
    st.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT", help=ADMIN_HELP)
    st.add_argument("--json", action="store_true")
    st.add_argument("--admin-token-file", metavar="FILE", help=TOKEN_HELP)
    _add_queue(sub)
    _add_cluster(sub)
    dkim.add_parser(sub)
    bounces.add_parser(sub)
    suppress.add_parser(sub, DEFAULT_ADMIN, ADMIN_HELP, TOKEN_HELP)
    shaping.add_parser(sub, DEFAULT_ADMIN, ADMIN_HELP, TOKEN_HELP)
    access.add_parsers(sub, DEFAULT_ADMIN, ADMIN_HELP, TOKEN_HELP)
    sink = sub.add_parser(
        "dev-sink",
        help="a local SMTP sink that records what it receives, to try mqnode without a mail "
        "server (mqnode dev-sink --help)",
        add_help=False,
    )
    sink.add_argument("sink_args", nargs=argparse.REMAINDER)
    return parser


def _queue(args: argparse.Namespace) -> int:
    cmd = args.queue_command
    if cmd == "list":
        query = f"?limit={args.limit}" + (f"&state={args.state}" if args.state else "")
        query += f"&domain={quote(args.domain)}" if args.domain else ""
        query += f"&sender={quote(args.sender)}" if args.sender is not None else ""
        # With --state or --sender a listing may read the whole queue (seconds at 1M).
        path = "/queue" + query
        msgs = remote.request(args.admin, path, remote.token(args), timeout_s=LIST_TIMEOUT_S)
        msgs = msgs["messages"]
        if args.json:
            print(json.dumps(msgs, indent=2))
        elif not msgs:
            print("Mail queue is empty")
        else:
            for m in msgs:
                views.print_message(m)
            print(f"-- {len(msgs)} message(s)")
        return 0
    if cmd == "show":
        m = remote.fetch(args.admin, f"/queue/{quote(args.id)}", remote.token(args))
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            print(views.show_text(m, time.time()))
        return 0
    if cmd == "cat":
        raw = remote.request(
            args.admin, f"/queue/{quote(args.id)}/body", remote.token(args), raw=True
        )
        if args.headers:
            raw = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        sys.stdout.buffer.write(raw)
        return 0
    filters = {"domain": args.domain, "sender": args.sender}
    if cmd == "flush":
        op, body = "retry", {"state": "deferred", **filters}
    else:
        op = cmd
        filtered = args.all or args.state or args.domain or args.sender is not None
        if args.ids and filtered:
            raise ConfigError("give queue ids or --all/--state/--domain/--sender, not both")
        if not args.ids and not filtered:
            raise ConfigError(f"queue {op}: name queue ids, or --all (with optional filters)")
        body = {"ids": args.ids} if args.ids else {"state": args.state, **filters}
    # A selection may be a million messages: committed 500 a command, it takes a while.
    timeout_s = 60.0 if "ids" in body else OPERATION_TIMEOUT_S
    result = remote.request(
        args.admin, f"/queue/{op}", remote.token(args), body, timeout_s=timeout_s
    )
    listed = result["affected"]
    count = result.get("count", len(listed))
    print(f"{op}: {count} message(s)")
    for qid in listed:
        print(f"  {qid}")
    if count > len(listed):
        print(f"  ... and {count - len(listed)} more")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] == "dev-sink":  # its own flags, --help included
        from mqnode.devtools import devsink

        return devsink.main(argv[1:], prog="mqnode dev-sink")
    args = parser.parse_args(switches_as_flags(argv))
    try:
        if args.command == "queue":
            return _queue(args)
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "restore":
            return _restore(args)
        if args.command == "dkim":
            return dkim.run(args)
        if args.command == "bounces":
            return bounces.run(args)
        if args.command == "suppress":
            return suppress.run(args)
        if args.command == "shaping":
            return shaping.run(args)
        if args.command == "principals":
            return access.run_principals(args)
        if args.command == "audit":
            return access.run_audit(args)
        if args.command == "status":
            st = remote.fetch(args.admin, "/status", remote.token(args))
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            else:
                views.print_status(st)
            return 0
        overrides = setting_overrides(args)
        cfg = NodeConfig.load(args.config, overrides)
        cfg.read_secret()
        logsetup.configure(cfg.log_level, cfg.node_id)
        from mqnode.node import Node

        def reload_config() -> NodeConfig:
            return NodeConfig.load(args.config, overrides)

        run_event_loop(Node(cfg, reload_config=reload_config).run())
        return 0
    except ConfigError as exc:
        print(f"mqnode: error: {exc}", file=sys.stderr)
        return 2
    except MqnodeError as exc:
        print(f"mqnode: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
