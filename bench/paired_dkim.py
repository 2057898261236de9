"""paired-dkim: what DKIM signing costs acceptance, against Postfix signing through OpenDKIM.

Five systems back to back in each round (bench/paired.py's rounds: fresh
start, unmeasured warm-up of twice the measured count, order rotated),
smtp-source, 1 KiB, one recipient, `plan.sessions` sessions:

  mqnode 3 nodes, 2 SMTP workers: unsigned, RSA-2048 signed, Ed25519 signed
  Postfix accept (unsigned), and Postfix + the OpenDKIM milter (RSA-2048)

Every message smtp-source writes is `From: <bench@sender.test>`, so every
one is signed; the keys are made once per run with `mqnode dkim keygen`'s
code, and OpenDKIM signs with the same RSA key file. A signed mqnode row
counts only if the cluster's metrics show every message signed. The
summary rows carry each row's ratio, per round, to the unsigned mqnode row
(signing's cost) and to Postfix + OpenDKIM (the reference to beat).
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from bench import opendkim, postfix
from bench.paired import WARMUP_CHUNKS, rounds
from bench.plan import KIB, WORKERS, Plan, Results, Step, bench_cluster
from bench.runners import Row
from bench.smtptools import SENDER
from mqnode.signing.keys import ED25519, RSA, keygen
from tests.support.cluster import Cluster

UNSIGNED = "mqnode 3 nodes, 2 smtp workers, unsigned"
RSA_SIGNED = "mqnode 3 nodes, 2 smtp workers, RSA-2048 signed"
ED_SIGNED = "mqnode 3 nodes, 2 smtp workers, Ed25519 signed"
POSTFIX_PLAIN = "Postfix accept"
POSTFIX_DKIM = "Postfix + OpenDKIM milter accept"
SYSTEMS = (UNSIGNED, RSA_SIGNED, ED_SIGNED, POSTFIX_PLAIN, POSTFIX_DKIM)
LABELS = {UNSIGNED: "x unsigned", POSTFIX_DKIM: "x Postfix + OpenDKIM"}
DOMAIN = SENDER.rpartition("@")[2]
RSA_SELECTOR, ED_SELECTOR = "bench-rsa", "bench-ed"


def paired_dkim(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    why = opendkim.available()
    if why is not None:
        step(f"paired-dkim: skipped ({why})")
        out.rows.append(Row("paired-dkim", POSTFIX_DKIM, note=f"skipped: {why}"))
        return
    keys = tmp / "keys"
    rsa_key = Path(keygen(DOMAIN, RSA_SELECTOR, RSA, 2048, keys).path)
    ed_key = Path(keygen(DOMAIN, ED_SELECTOR, ED25519, 0, keys).path)
    key_of = {RSA_SIGNED: rsa_key, ED_SIGNED: ed_key}

    def measure(name: str, messages: int, row: Row, base: Path) -> float:
        warmup = WARMUP_CHUNKS * messages
        if name in (POSTFIX_PLAIN, POSTFIX_DKIM):
            return _postfix(name, messages, warmup, plan, rsa_key)
        extra: tuple[str, ...] = WORKERS
        if name in key_of:
            extra += ("--dkim-key", f"{DOMAIN}:{_selector(name)}:{key_of[name]}")
        with bench_cluster(base / name.replace(" ", "-").replace(",", ""), 3, extra=extra) as c:
            port = c.nodes[c.leader()].smtp_port
            postfix.run_source(port, warmup, plan.sessions, KIB, max_s=plan.max_s)
            _, rate = postfix.run_source(port, messages, plan.sessions, KIB, max_s=plan.max_s)
            if name in key_of:
                signed = signed_count(c, warmup + messages)
                row.extra["signed"] = signed
                if signed < warmup + messages:
                    raise postfix.PostfixBenchError(
                        f"{signed} of {warmup + messages} messages signed"
                    )
            return rate

    refs = (UNSIGNED, POSTFIX_DKIM)
    rounds("paired-dkim", SYSTEMS, measure, plan, tmp, step, out, refs, LABELS)


def _selector(name: str) -> str:
    return RSA_SELECTOR if name == RSA_SIGNED else ED_SELECTOR


def _postfix(name: str, messages: int, warmup: int, plan: Plan, key: Path) -> float:
    if name == POSTFIX_PLAIN:
        accept, _ = postfix.measure_postfix(
            messages, plan.sessions, KIB, max_s=plan.max_s, warmup=warmup
        )
        return accept.rate
    with opendkim.signing_milter(key, DOMAIN, RSA_SELECTOR) as milter:
        accept, _ = postfix.measure_postfix(
            messages,
            plan.sessions,
            KIB,
            max_s=plan.max_s,
            warmup=warmup,
            extra_main_cf=opendkim.postfix_settings(milter),
        )
    return accept.rate


_SIGNED = re.compile(r'^mqnode_dkim_signed_messages_total\{domain="([^"]+)"\} (\S+)$', re.M)


def signed_count(c: Cluster, expected: int, wait_s: float = 10.0) -> int:
    """Messages signed for DOMAIN, summed over the cluster's nodes, once it reaches
    `expected` or after `wait_s` (SMTP workers push their counts every second)."""
    deadline = time.monotonic() + wait_s
    while True:
        total = 0.0
        for node in c.nodes:
            with urllib.request.urlopen(node.admin_url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            total += sum(float(v) for d, v in _SIGNED.findall(text) if d == DOMAIN)
        if total >= expected or time.monotonic() > deadline:
            return int(total)
        time.sleep(0.5)
