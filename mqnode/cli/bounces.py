"""`mqnode bounces classify`: which category a delivery reply gets, and from which rule.

    mqnode bounces classify "550 5.1.1 <bob@example.org>: user unknown"
    mqnode bounces classify --host mx1.example.net --rules-file my-rules.toml "421 ..."
    mqnode bounces classify --config mqnode.toml - < replies.txt    # one reply per line

For writing and checking a rules file before a node reads it (SIGHUP or a
restart): the same rules, in the same order, as the node's. Events, metrics
and `queue show` carry the category of each deferred or bounced recipient.
"""

from __future__ import annotations

import sys
from typing import Any

from mqnode.config import NodeConfig
from mqnode.delivery.bounce_classes import MAX_REPLY_CHARS, BounceClassifier

MAX_LINES = 100_000


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bounces", help="bounce categories: classify a delivery reply")
    bsub = b.add_subparsers(dest="bounces_command", required=True)
    c = bsub.add_parser("classify", help="the category of a reply, and the rule that gave it")
    c.add_argument("reply", help='the reply text, quoted; "-" reads one per line from stdin')
    c.add_argument("--host", default="", help="the host that answered (rules may name it)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--rules-file", default="", metavar="FILE", help="an operator's rules")
    src.add_argument("--config", metavar="FILE", help="the node's config (its bounce_rules_file)")


def run(args: Any) -> int:
    path = args.rules_file
    if args.config:
        path = NodeConfig.load(args.config, {}).bounce_rules_file
    classifier = BounceClassifier.load(path)
    if args.reply != "-":
        category, rule = classifier.explain(args.reply, args.host)
        print(f"{category}  ({rule})")
        return 0
    for n, line in enumerate(sys.stdin):
        if n >= MAX_LINES:
            print(f"mqnode: stopped after {MAX_LINES} lines", file=sys.stderr)
            return 1
        reply = line.rstrip("\r\n")[:MAX_REPLY_CHARS]
        if reply:
            category, _ = classifier.explain(reply, args.host)
            print(f"{category}\t{reply}")
    return 0
