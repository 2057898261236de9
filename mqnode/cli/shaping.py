"""`mqnode shaping apply FILE` and `mqnode shaping show`: the cluster's traffic shaping rules.

    mqnode shaping apply shaping.toml     # checked here, then committed through the log
    mqnode shaping show [--json]          # the rules applied, and the sites' state now

The format is in mqnode/spool/shaping_rules.py. A file that cannot be used is
refused whole, with one line naming the site, before anything is sent; the
node checks it again. `show` on the lease holder also lists each site met
so far: its rate now (halved by throttling replies), claims, suspensions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mqnode.cli import remote
from mqnode.errors import ConfigError
from mqnode.spool.shaping_rules import MAX_RULES_BYTES, ShapingRules


def add_parser(sub: Any, admin_default: str, admin_help: str, token_help: str) -> None:
    s = sub.add_parser("shaping", help="traffic shaping per receiving site: apply, show")
    ssub = s.add_subparsers(dest="shaping_command", required=True)
    apply = ssub.add_parser("apply", help="check a rules file and apply it cluster-wide")
    apply.add_argument("file", type=Path)
    show = ssub.add_parser("show", help="the rules applied and the sites' state")
    show.add_argument("--json", action="store_true")
    for p in ssub.choices.values():
        p.add_argument("--admin", default=admin_default, metavar="HOST:PORT", help=admin_help)
        p.add_argument("--admin-token-file", metavar="FILE", help=token_help)


def run(args: Any) -> int:
    token = remote.token(args)
    if args.shaping_command == "apply":
        try:
            raw = args.file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{args.file}: {exc.strerror}") from exc
        if len(raw) > MAX_RULES_BYTES:
            raise ConfigError(f"{args.file}: larger than {MAX_RULES_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{args.file}: not UTF-8") from exc
        rules = ShapingRules.parse(text)  # ConfigError naming the site, before any request
        remote.request(args.admin, "/shaping", token, {"text": text})
        names = ", ".join(s.name for s in rules.sites) or "none"
        print(f"applied: {len(rules.sites)} site(s) ({names}) and a default")
        return 0
    view = remote.request(args.admin, "/shaping", token)
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return 0
    if not view["text"]:
        print("no shaping rules applied")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view["applied_ms"] / 1000))
        print(f"applied {when}:")
        print(view["text"].rstrip())
    for site in view["sites"]:
        state = f"{site['per_s']}/s of {site['configured_per_s'] or 'unlimited'}"
        if site["suspended_for_s"]:
            state += f", suspended for {site['suspended_for_s']} s: {site.get('why', '')}"
        print(f"site {site['site']}: {state}, {site['claimed']} claimed")
    return 0
