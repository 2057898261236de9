"""MxResolver against a real DNS server (tests/support/dnsserver.py) on 127.0.0.1.

One in-process server per module; each test starts from `ZONES` with the
query log cleared, and may replace the zones. Cache expiry is driven with a
ManualClock, never by sleeping. The only waits are DNS timeouts of 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import pytest

from mqnode.clock import ManualClock
from mqnode.delivery.mx import MxAnswer, MxHost, MxResolver
from tests.support.cluster import FAST_TUNING, Cluster
from tests.support.dnsserver import DnsServer
from tests.support.smtp import make_message
from tests.support.smtpsink import SinkHost, bind_common_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SHORT_TIMEOUT_S = 0.3
REPO = Path(__file__).resolve().parents[2]

ZONES: dict[str, Any] = {
    "example.test": {"MX": [[20, "mx2.example.test"], [10, "mx1.example.test"]]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "ties.test": {
        "MX": [[10, "a.ties.test"], [10, "b.ties.test"], [10, "c.ties.test"], [20, "z.ties.test"]]
    },
    "a.ties.test": {"A": ["127.0.0.11"]},
    "b.ties.test": {"A": ["127.0.0.12"]},
    "c.ties.test": {"A": ["127.0.0.13"]},
    "z.ties.test": {"A": ["127.0.0.19"]},
    "nomx.test": {"A": ["127.0.0.4"], "AAAA": ["::1"]},
    "v6only.test": {"AAAA": ["::1"]},
    "nothing.test": {"TXT": ["v=spf1 -all"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "servfail.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "partial.test": {
        "MX": [[5, "gone.partial.test"], [7, "broken.partial.test"], [10, "mx1.example.test"]]
    },
    "broken.partial.test": "SERVFAIL",
    "dead.test": {"MX": [[10, "gone.dead.test"], [20, "slow.test"]]},
    "big.test": {"A": [f"127.0.1.{i}" for i in range(1, 151)]},
    "long.test": {"MX": [[10, "mx.long.test"]], "TTL": 3600},
    "mx.long.test": {"A": ["127.0.0.8"], "TTL": 3600},
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONES, ttl=60) as srv:
        yield srv


@pytest.fixture
def dns(server: DnsServer) -> DnsServer:
    server.set_zones(ZONES)
    server.reset_queries()
    return server


def resolver(
    dns: DnsServer, clock: ManualClock | None = None, seed: int = 1, **kw: Any
) -> MxResolver:
    return MxResolver(
        ("127.0.0.1", dns.port), timeout_s=kw.pop("timeout_s", 2.0), rng=Random(seed),
        clock=clock or ManualClock(), **kw,
    )  # fmt: skip


def resolve(r: MxResolver, domain: str) -> MxAnswer:
    return asyncio.run(r.resolve(domain))


def names(answer: MxAnswer) -> list[str]:
    return [h.name for h in answer.hosts]


def test_mx_hosts_in_preference_order_ipv4_first(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "example.test")
    assert answer.kind == "hosts", answer
    assert answer.hosts == (
        MxHost(10, "mx1.example.test", ("127.0.0.2",)),
        MxHost(20, "mx2.example.test", ("127.0.0.3", "::1")),
    )


def test_equal_preferences_shuffled_deterministically_by_seed(dns: DnsServer) -> None:
    def orders(seed: int) -> list[list[str]]:
        r = resolver(dns, seed=seed)
        return [names(resolve(r, "ties.test")) for _ in range(6)]

    first = orders(7)
    assert first == orders(7), "same seed, same call sequence: same orders"
    for order in first:
        assert sorted(order[:3]) == ["a.ties.test", "b.ties.test", "c.ties.test"], order
        assert order[3] == "z.ties.test", "preference 20 always comes last"
    seen = {tuple(o) for seed in range(5) for o in orders(seed)}
    assert len(seen) > 1, "ties are shuffled, not fixed"
    assert dns.query_count("ties.test", "MX") == 7, "each of 7 resolvers looked up once"


def test_no_mx_falls_back_to_the_domain_address(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "nomx.test")
    assert answer.kind == "hosts", answer
    assert answer.hosts == (MxHost(0, "nomx.test", ("127.0.0.4", "::1")),)
    only_v6 = resolve(resolver(dns), "v6only.test")
    assert only_v6.hosts == (MxHost(0, "v6only.test", ("::1",)),)


def test_no_mx_and_no_address_is_permanent(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "nothing.test")
    assert answer.kind == "nxdomain", answer
    assert "no MX and no address" in answer.reason


def test_null_mx(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "nullmx.test")
    assert (answer.kind, answer.hosts) == ("null_mx", ())
    assert dns.query_count(rdtype="A") == 0, "a null MX ends the lookup"


def test_nxdomain(dns: DnsServer) -> None:
    for domain in ("nosuch.test", "under.example.test"):
        answer = resolve(resolver(dns), domain)
        assert (answer.kind, answer.hosts) == ("nxdomain", ()), answer
        assert "NXDOMAIN" in answer.reason


def test_servfail_is_temporary(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "servfail.test")
    assert answer.kind == "temp_fail", answer
    assert "SERVFAIL" in answer.reason


def test_timeout_is_temporary(dns: DnsServer) -> None:
    answer = resolve(resolver(dns, timeout_s=SHORT_TIMEOUT_S), "slow.test")
    assert answer.kind == "temp_fail", answer
    assert "Timeout" in answer.reason


def test_no_nameserver_listening_is_temporary(dns: DnsServer) -> None:
    with DnsServer({}) as gone:
        port = gone.port
    r = MxResolver(("127.0.0.1", port), timeout_s=SHORT_TIMEOUT_S, clock=ManualClock())
    answer = resolve(r, "example.test")
    assert answer.kind == "temp_fail", answer


def test_unresolvable_exchanges_are_skipped(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "partial.test")
    assert answer.kind == "hosts", answer
    assert answer.hosts == (MxHost(10, "mx1.example.test", ("127.0.0.2",)),)


def test_all_exchanges_unresolvable_is_temporary(dns: DnsServer) -> None:
    answer = resolve(resolver(dns, timeout_s=SHORT_TIMEOUT_S), "dead.test")
    assert answer.kind == "temp_fail", answer
    assert "gone.dead.test" in answer.reason and "slow.test" in answer.reason


def test_domain_literals_need_no_dns(dns: DnsServer) -> None:
    r = resolver(dns)
    v4 = resolve(r, "[127.0.0.5]")
    assert v4 == MxAnswer("hosts", (MxHost(0, "127.0.0.5", ("127.0.0.5",)),), v4.reason)
    v6 = resolve(r, "[IPv6:::1]")
    assert v6.hosts == (MxHost(0, "::1", ("::1",)),)
    for bad in ("[127.0.0]", "[::1]", "[IPv6:127.0.0.1]"):
        assert resolve(r, bad).kind == "nxdomain", bad
    assert dns.queries == []


def test_case_and_trailing_dot_are_normalised(dns: DnsServer) -> None:
    r = resolver(dns)
    answers = [resolve(r, d) for d in ("Example.TEST.", "example.test", " EXAMPLE.test ")]
    assert all(a.hosts == answers[0].hosts for a in answers)
    assert names(answers[0]) == ["mx1.example.test", "mx2.example.test"]
    assert dns.queries[0] == ("example.test", "MX")
    assert dns.query_count("example.test", "MX") == 1, "one cache entry for all spellings"


def test_large_answer_comes_over_tcp(dns: DnsServer) -> None:
    answer = resolve(resolver(dns), "big.test")
    assert answer.kind == "hosts", answer
    assert len(answer.hosts[0].addresses) == 150
    assert dns.query_count("big.test", "A") == 2, "UDP truncated, then TCP"


def test_burst_to_one_domain_does_one_lookup(dns: DnsServer) -> None:
    r = resolver(dns)

    async def burst() -> list[MxAnswer]:
        first = await asyncio.gather(*(r.resolve("example.test") for _ in range(20)))
        return [*first, *[await r.resolve("example.test") for _ in range(20)]]

    answers = asyncio.run(burst())
    assert {a.kind for a in answers} == {"hosts"}
    assert dns.query_count("example.test", "MX") == 1
    assert dns.query_count("mx1.example.test", "A") == 1


def test_cache_expires_by_ttl_on_the_clock(dns: DnsServer) -> None:
    clock = ManualClock()
    r = resolver(dns, clock=clock)
    assert names(resolve(r, "example.test")) == ["mx1.example.test", "mx2.example.test"]
    dns.set_zones({**ZONES, "example.test": {"MX": [[10, "mx2.example.test"]]}})
    clock.advance(59)
    assert names(resolve(r, "example.test")) == ["mx1.example.test", "mx2.example.test"]
    assert dns.query_count("example.test", "MX") == 1
    clock.advance(2)
    assert names(resolve(r, "example.test")) == ["mx2.example.test"]
    assert dns.query_count("example.test", "MX") == 2


def test_cache_ttl_is_capped(dns: DnsServer) -> None:
    clock = ManualClock()
    r = resolver(dns, clock=clock, cache_max_ttl_s=300.0)
    resolve(r, "long.test")
    clock.advance(299)
    resolve(r, "long.test")
    assert dns.query_count("long.test", "MX") == 1
    clock.advance(2)
    resolve(r, "long.test")
    assert dns.query_count("long.test", "MX") == 2, "a 3600 s TTL is held at most 300 s"


def test_negative_answers_are_cached_by_soa(dns: DnsServer) -> None:
    clock = ManualClock()
    r = resolver(dns, clock=clock)
    assert resolve(r, "later.test").kind == "nxdomain"
    dns.set_zones({**ZONES, "later.test": {"MX": [[10, "mx1.example.test"]]}})
    clock.advance(30)
    assert resolve(r, "later.test").kind == "nxdomain", "NXDOMAIN cached for the SOA TTL"
    clock.advance(31)
    assert resolve(r, "later.test").kind == "hosts"
    assert dns.query_count("later.test", "MX") == 2


def test_temp_fail_is_cached_briefly_then_retried(dns: DnsServer) -> None:
    clock = ManualClock()
    r = resolver(dns, clock=clock, temp_fail_ttl_s=10.0)
    assert resolve(r, "servfail.test").kind == "temp_fail"
    dns.set_zones({**ZONES, "servfail.test": {"A": ["127.0.0.7"]}})
    assert resolve(r, "servfail.test").kind == "temp_fail"
    assert dns.query_count("servfail.test", "MX") == 1
    clock.advance(11)
    assert resolve(r, "servfail.test").hosts == (MxHost(0, "servfail.test", ("127.0.0.7",)),)


def test_cache_size_is_bounded(dns: DnsServer) -> None:
    r = resolver(dns, cache_max_entries=2)
    for domain in ("example.test", "nomx.test", "nullmx.test", "example.test"):
        resolve(r, domain)
    assert dns.query_count("example.test", "MX") == 2, "evicted as least recently used"


def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(dns: DnsServer) -> None:
    r = resolver(dns, timeout_s=SHORT_TIMEOUT_S)

    async def race() -> MxAnswer:
        loser = asyncio.create_task(r.resolve("slow.test"))
        winner = asyncio.create_task(r.resolve("slow.test"))
        await asyncio.sleep(0.05)
        loser.cancel()
        answer = await winner
        assert loser.cancelled()
        return answer

    assert asyncio.run(race()).kind == "temp_fail"
    assert dns.query_count("slow.test", "MX") >= 1


def test_nameserver_must_be_an_ip_address() -> None:
    with pytest.raises(ValueError):
        MxResolver(("localhost", 53))


def _read_line(proc: subprocess.Popen[str], deadline_s: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=deadline_s):
            raise AssertionError(f"dnsserver printed nothing within {deadline_s} s")
    return proc.stdout.readline()


def test_subprocess_server_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    zones_file = tmp_path / "zones.json"
    zones_file.write_text(json.dumps({"sub.test": {"MX": [[10, "mx1.example.test"]]}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dnsserver", "--listen", "127.0.0.1:0",
         "--zones", str(zones_file), "--query-log", str(tmp_path / "queries.log")],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        line = _read_line(proc, 10.0)
        assert line.startswith("dnsserver listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        r = MxResolver(("127.0.0.1", port), timeout_s=2.0, clock=ManualClock())
        assert resolve(r, "sub.test").kind == "temp_fail", "exchange not in this zone file"
        zones_file.write_text(json.dumps({"sub.test": {"MX": [[0, "."]]}}))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10.0
        kind = ""
        while time.monotonic() < deadline and kind != "null_mx":
            r.clear_cache()
            kind = resolve(r, "sub.test").kind
            if kind != "null_mx":
                time.sleep(0.05)
        assert kind == "null_mx", "SIGHUP did not reload the zones within 10 s"
        assert "sub.test MX\n" in (tmp_path / "queries.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_mail_to_address_literals_and_idn_domains_is_delivered(
    dns: DnsServer, tmp_path: Path
) -> None:
    """End to end on a real node: `user@[127.0.0.5]` goes to that address without DNS,
    `user@bücher.test` (submitted with SMTPUTF8) is looked up as its A-label, and a quoted
    local part arrives as written."""
    dns.set_zones({**ZONES, "xn--bcher-kva.test": {"A": ["127.0.0.6"]}})
    port, socks = bind_common_port(["127.0.0.5", "127.0.0.6"])
    with SinkHost() as host:
        literal = host.add("literal", socks["127.0.0.5"])
        idn = host.add("idn", socks["127.0.0.6"])
        args = (*FAST_TUNING, "--delivery-port", str(port))
        with Cluster(tmp_path, n=1, extra_args=args, dns_server=f"{dns.host}:{dns.port}") as c:
            node = c.nodes[0]
            rcpts = ["user@[127.0.0.5]", '"john smith"@[127.0.0.5]', "user@bücher.test"]
            body = make_message(600, rcpt="many").data
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as s:
                s.sendmail("a@client.test", rcpts, body, mail_options=["SMTPUTF8"])

            def arrived() -> tuple[list[str] | None, str]:
                got = sorted(r for d in literal.datas + idn.datas for r in d.rcpts)
                return (got if len(got) == 3 else None), f"arrived so far: {got}"

            got = c.poll("the three recipients at their hosts", arrived, 30)
    # The IDN host offers no SMTPUTF8: the ASCII local part goes with the A-label domain.
    assert got == sorted([*rcpts[:2], "user@xn--bcher-kva.test"]), got
