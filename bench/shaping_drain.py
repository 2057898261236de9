"""shaping: a backlog for one rate-limited site drains at its rate, and other mail still goes.

A 3-node cluster delivering by MX (a real DNS server on loopback, two
receiving sinks) with shaping rules applied through the log: site `bulk`
(`bulk.bench.test`) limited to `RATE` messages per second, everything else
unlimited. First a backlog for `bulk` is queued with smtp-source
(`BACKLOG` messages, accepted far faster than the site may take them: in
full mode 100,000, behind which other mail must not wait); then, while it
drains, `OTHER` messages for another domain. Rows:

  bulk site drain   its delivery rate over its first `RATE` x `DRAIN_S`
                    deliveries after the first second's burst, x the
                    configured rate (1.00 is exact)
  other site        messages per second end to end (smtp-source's start to
                    the last arrival) while the backlog drains, x the same
                    measured alone before the backlog, after an unmeasured
                    round (1.00: not slowed)

Bounded: every wait ends after `plan.max_s` plus the drain's expected time;
the cluster and sinks are stopped and their data removed.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

from bench import postfix
from bench.plan import KIB, SMTP_SOURCE, WORKERS, Plan, Results, Step
from bench.runners import Row
from tests.support.cluster import ADMIN_TOKEN, Cluster
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import Sink, SinkHost, arrival_times, bind_common_port

RATE = 50.0
DRAIN_S = {"full": 60, "quick": 10}  # the window the bulk site's rate is measured over
BACKLOG = {"full": 100_000, "quick": 1000}  # queued for it: far more than drains meanwhile
OTHER = 500
HOSTS = {"bulk": "127.0.0.41", "other": "127.0.0.42"}
RULES = f"""
[[site]]
name = "bulk"
domains = ["bulk.bench.test"]
messages_per_second = {RATE}
"""


def shaping(plan: Plan, tmp: Path, step: Step, out: Results) -> None:
    backlog = plan.shaping_backlog or BACKLOG.get(plan.mode, 1000)
    measured = int(RATE * DRAIN_S.get(plan.mode, 10))
    params = {"size": KIB, "sessions": plan.sessions, "messages": backlog, "rate": RATE}
    params["generator"] = SMTP_SOURCE
    port, socks = bind_common_port(list(HOSTS.values()))
    zones = {
        "bulk.bench.test": {"MX": [[10, "mx.bulk.bench.test"]]},
        "mx.bulk.bench.test": {"A": [HOSTS["bulk"]]},
        "other.bench.test": {"MX": [[10, "mx.other.bench.test"]]},
        "mx.other.bench.test": {"A": [HOSTS["other"]]},
    }
    base = tmp / "shaping"
    queue_s = max(plan.max_s * 5, backlog / 400)  # bounded: 400 msg/s at least
    # The DNS server and the sinks stop themselves after their lifetime: the whole run's.
    lifetime_s = queue_s + 4 * plan.max_s + measured / RATE + 600
    try:
        with (
            DnsServer(zones, max_lifetime_s=lifetime_s) as dns,
            SinkHost(max_lifetime_s=lifetime_s) as host,
        ):
            sinks = {name: host.add(name, socks[ip]) for name, ip in HOSTS.items()}
            args = (*WORKERS, "--delivery-port", str(port))
            with Cluster(
                base, n=3, extra_args=args, dns_server=f"{dns.host}:{dns.port}", start_timeout_s=60
            ) as c:
                lead = c.leader()
                _apply(c, lead)
                smtp = c.nodes[lead].smtp_port
                step("shaping: other site alone")
                _other(smtp, sinks["other"], plan)  # unmeasured: a fresh cluster warms up
                alone = _other(smtp, sinks["other"], plan)
                step(f"shaping: {backlog} messages for the bulk site, then other mail")
                postfix.run_source(
                    smtp, backlog, plan.sessions, KIB, max_s=queue_s, to="u@bulk.bench.test"
                )
                try:
                    during: float | None = _other(smtp, sinks["other"], plan)
                except postfix.PostfixBenchError as exc:  # reported in its row
                    during, why = None, str(exc)
                times = _wait(sinks["bulk"], measured, plan.max_s + measured / RATE)[:measured]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    burst = int(RATE)
    drain = (len(times) - burst - 1) / (times[-1] - times[burst]) if len(times) > burst + 1 else 0
    row = Row("shaping", "bulk site drain", dict(params), rate=drain)
    row.acked = row.attempted = backlog
    row.note = f"x configured {drain / RATE:.3f} over its first {len(times)} deliveries"
    other = Row("shaping", "other site while the bulk site drains", {**params, "messages": OTHER})
    other.rate, other.attempted = during, OTHER
    if during is None:
        other.note = f"failed: {why}"
    else:
        other.acked = OTHER
        other.note = f"x alone {during / alone:.2f} (alone {alone:.0f} msg/s)" if alone else ""
    out.rows += [row, other]


def _apply(c: Cluster, i: int) -> None:
    req = urllib.request.Request(
        c.nodes[i].admin_url + "/shaping",
        data=json.dumps({"text": RULES}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def _other(smtp: int, sink: Sink, plan: Plan) -> float:
    before = len(sink.datas)
    t0 = time.monotonic()
    postfix.run_source(smtp, OTHER, plan.sessions, KIB, max_s=plan.max_s, to="u@other.bench.test")
    _wait(sink, before + OTHER, plan.max_s)
    return OTHER / (time.monotonic() - t0)


def _wait(sink: Sink, n: int, timeout_s: float) -> list[float]:
    try:
        return arrival_times(sink, n, timeout_s)
    except TimeoutError as exc:
        raise postfix.PostfixBenchError(str(exc)) from exc
