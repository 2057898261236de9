"""`mqnode dkim keygen` and `mqnode dkim check`: make a key, see that DNS publishes it.

    mqnode dkim keygen --domain D --selector S [--algorithm rsa|ed25519] [--bits N] --out DIR
    mqnode dkim check --domain D --selector S (--key FILE | --config FILE) [--dns-server IP:PORT]

keygen writes DIR/D.S.key (mode 600) and prints the TXT record to publish at
S._domainkey.D, and the `dkim_keys` entry that uses it. check looks the record
up and says whether it holds this key's public half, and whether the domain
publishes a DMARC policy (without one, receivers apply none, and the large
mailbox providers ask bulk senders for one). Exit 0 when the record matches.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from mqnode.config import NodeConfig, parse_hostport
from mqnode.delivery.mx import lookup_txt
from mqnode.errors import ConfigError
from mqnode.signing.keys import DEFAULT_RSA_BITS, ED25519, RSA, load_key, parse_spec, zone_lines
from mqnode.signing.keys import keygen as make_key


def add_parser(sub: Any) -> None:
    d = sub.add_parser("dkim", help="DKIM keys: make one, check its DNS record")
    dsub = d.add_subparsers(dest="dkim_command", required=True)
    gen = dsub.add_parser("keygen", help="make a key and print the DNS record to publish")
    check = dsub.add_parser("check", help="is the key published, and is there a DMARC policy?")
    for p in (gen, check):
        p.add_argument("--domain", required=True, help="the signing domain (d=)")
        p.add_argument("--selector", required=True, help="the selector (s=)")
    gen.add_argument("--algorithm", choices=[RSA, ED25519], default=RSA, help="(default: rsa)")
    gen.add_argument(
        "--bits", type=int, default=DEFAULT_RSA_BITS, help="RSA key size (default: 2048)"
    )
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write it")
    check.add_argument("--key", metavar="FILE", help="the private key file")
    check.add_argument("--config", metavar="FILE", help="a node's TOML file (its dkim_keys)")
    check.add_argument("--dns-server", metavar="IP:PORT", help="(default: the system's)")


def run(args: argparse.Namespace) -> int:
    if args.dkim_command == "keygen":
        key = make_key(args.domain, args.selector, args.algorithm, args.bits, args.out)
        print(f"wrote {key.path} (mode 600); publish this TXT record:\n")
        print(zone_lines(key))
        print(f'\nand sign with it: dkim_keys = ["{key.domain}:{key.selector}:{key.path}"]')
        return 0
    return _check(args)


def _key_path(args: argparse.Namespace, domain: str, selector: str) -> str:
    if args.key:
        return str(args.key)
    if not args.config:
        raise ConfigError("dkim check: give --key FILE or --config FILE")
    cfg = NodeConfig.load(args.config, {})
    for spec in cfg.dkim_keys:
        d, s, path = parse_spec(spec)
        if (d, s) == (domain, selector):
            return path
    raise ConfigError(f"dkim check: {args.config} has no dkim_keys entry for {domain}:{selector}")


def _check(args: argparse.Namespace) -> int:
    domain, selector, _ = parse_spec(f"{args.domain}:{args.selector}:-")
    key = load_key(domain, selector, _key_path(args, domain, selector))
    server = parse_hostport(args.dns_server, "--dns-server") if args.dns_server else None
    status, texts = asyncio.run(lookup_txt(key.record_name, server))
    ok = False
    if status != "ok":
        print(f"{key.record_name}: {status}; publish:\n{zone_lines(key)}")
    else:
        tags = [
            _tags(t) for t in texts if _tags(t).get("v", "DKIM1") == "DKIM1" and "p" in _tags(t)
        ]
        ok = any(t["p"] == key.public_b64 for t in tags)
        if ok:
            print(f"{key.record_name}: published, and it is this key's ({key.algorithm})")
        elif tags:
            print(f"{key.record_name}: published, but not this key: publish\n{zone_lines(key)}")
        else:
            print(f"{key.record_name}: TXT records, but no DKIM key among them")
    status, texts = asyncio.run(lookup_txt(f"_dmarc.{domain}", server))
    policies = [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")]
    if policies:
        print(f"_dmarc.{domain}: DMARC policy p={_tags(policies[0]).get('p', '?')}")
    else:
        print(
            f"_dmarc.{domain}: no DMARC policy ({status if status != 'ok' else 'no DMARC1 record'})"
            "; receivers apply none, and large mailbox providers ask senders for one"
        )
    return 0 if ok else 1


def _tags(text: str) -> dict[str, str]:
    """A tag=value list (DKIM, DMARC); whitespace inside values (folded p=) removed."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out[name.strip()] = "".join(value.split())
    return out
