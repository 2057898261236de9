"""MxResolver: where to deliver mail for a domain (RFC 5321 §5.1, RFC 7505).

The only module that imports dnspython. `resolve(domain)` never raises for a
DNS outcome; it returns an `MxAnswer` whose `kind` tells the caller what to do:

    hosts      deliver: `hosts` in the order to try (preference ascending,
               equal preferences shuffled with the injected rng on every call;
               within a host IPv4 addresses first, then IPv6)
    null_mx    bounce now: the domain publishes "MX 0 ." (RFC 7505)
    nxdomain   bounce now: the domain does not exist, it has neither MX nor
               A/AAAA records, or it is not a valid name or address literal
    temp_fail  defer: SERVFAIL, timeout, no nameserver answered, or MX
               records exist but none of their exchanges resolves

Rules:
- Names are lower-cased and one trailing dot is stripped; they are always
  queried as absolute names (no search list).
- Address literals `[127.0.0.5]` and `[IPv6:::1]` give one host of preference
  0 named by the address, without DNS.
- An exchange whose A and AAAA lookups give no address is skipped. No MX
  records (NODATA) means the domain itself is the one host, preference 0.
  A single MX with exchange "." is a null MX; a "." among other MX records is
  ignored.

Caching: whole answers are cached per domain, keyed by the normalised name,
for the smallest TTL seen (negative answers: the SOA's min(TTL, MINIMUM),
RFC 2308, else `negative_ttl_s`), capped at `cache_max_ttl_s`; temp_fail
answers for `temp_fail_ttl_s`. Expiry uses the injected `Clock`. Concurrent
resolves of one domain share one lookup, so a burst costs one set of queries.

Settings and limits:
    nameserver          (ip, port) of the one server to ask (`--dns-server`);
                        None reads the system configuration (/etc/resolv.conf;
                        if it is missing every lookup is temp_fail)
    timeout_s           per DNS query, retries included. A resolve makes up to
                        three rounds (MX, then A+AAAA of all exchanges in
                        parallel), so it returns within about 3 * timeout_s
    cache_max_ttl_s     300     upper bound on any cached answer
    cache_max_entries   10000   least recently used domains are evicted
    negative_ttl_s      60      negative answers without an SOA
    temp_fail_ttl_s     30      so a batch to a broken domain waits once
    max_exchanges       10      MX records considered, lowest preference first
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mqnode.clock import Clock, SystemClock
from mqnode.spool.addresses import ascii_domain

MxKind = Literal["hosts", "null_mx", "nxdomain", "temp_fail"]


@dataclass(frozen=True)
class MxHost:
    preference: int
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MxAnswer:
    kind: MxKind
    hosts: tuple[MxHost, ...]
    reason: str


@dataclass(frozen=True)
class _Records:
    """One query's outcome: `ok` with rdata texts, or `nodata`/`nxdomain`/`error`."""

    status: Literal["ok", "nodata", "nxdomain", "error"]
    texts: tuple[str, ...]
    ttl_s: float
    reason: str


class MxResolver:
    """Resolves a mail domain to an ordered list of hosts; see the module docstring.

    Assumes one event loop at a time; the instance may be reused across loops
    once its lookups have finished.
    """

    def __init__(
        self,
        nameserver: tuple[str, int] | None,
        timeout_s: float = 5.0,
        rng: random.Random | None = None,
        *,
        clock: Clock | None = None,
        cache_max_ttl_s: float = 300.0,
        cache_max_entries: int = 10_000,
        negative_ttl_s: float = 60.0,
        temp_fail_ttl_s: float = 30.0,
        max_exchanges: int = 10,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if cache_max_entries < 1 or max_exchanges < 1:
            raise ValueError("cache_max_entries and max_exchanges must be at least 1")
        self._timeout_s = timeout_s
        self._rng = rng if rng is not None else random.Random()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._cache_max_ttl_s = cache_max_ttl_s
        self._cache_max_entries = cache_max_entries
        self._negative_ttl_s = negative_ttl_s
        self._temp_fail_ttl_s = temp_fail_ttl_s
        self._max_exchanges = max_exchanges
        self._resolver = _make_resolver(nameserver, timeout_s)
        self._cache: OrderedDict[str, tuple[float, MxAnswer]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[MxAnswer, float]]] = {}

    async def resolve(self, domain: str) -> MxAnswer:
        """The hosts for `domain`, or why there are none. Never raises for DNS outcomes."""
        name = domain.strip().lower()
        if name.endswith("."):
            name = name[:-1]
        if name.startswith("[") and name.endswith("]"):
            return _literal(name)
        try:
            name = ascii_domain(name)  # U-labels (SMTPUTF8 mail) are looked up as A-labels
        except ValueError as exc:
            return MxAnswer("nxdomain", (), f"invalid domain name {domain!r}: {exc}")
        cached = self._cache_get(name)
        if cached is not None:
            return self._shuffle_ties(cached)
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(name))
            self._inflight[name] = task
            task.add_done_callback(functools.partial(self._finish, name))
        # shield: a cancelled caller must not cancel the lookup others share.
        answer, _ = await asyncio.shield(task)
        return self._shuffle_ties(answer)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- cache -----------------------------------------------------------------

    def _cache_get(self, name: str) -> MxAnswer | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        expires_at, answer = entry
        if self._clock.monotonic_s() >= expires_at:
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return answer

    def _finish(self, name: str, task: asyncio.Task[tuple[MxAnswer, float]]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if task.cancelled() or task.exception() is not None:
            return
        answer, ttl_s = task.result()
        ttl_s = min(ttl_s, self._cache_max_ttl_s)
        if ttl_s <= 0:
            return
        self._cache[name] = (self._clock.monotonic_s() + ttl_s, answer)
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_max_entries:
            self._cache.popitem(last=False)

    def _shuffle_ties(self, answer: MxAnswer) -> MxAnswer:
        if len(answer.hosts) < 2:
            return answer
        ordered: list[MxHost] = []
        for _, group in itertools.groupby(answer.hosts, key=lambda h: h.preference):
            same = list(group)
            self._rng.shuffle(same)
            ordered.extend(same)
        return MxAnswer(answer.kind, tuple(ordered), answer.reason)

    # -- lookups -----------------------------------------------------------------

    async def _lookup(self, domain: str) -> tuple[MxAnswer, float]:
        """The answer (hosts sorted by preference, then name) and its cache TTL."""
        try:
            qname = dns.name.from_text(domain + ".")
        except (dns.exception.DNSException, UnicodeError) as exc:
            return MxAnswer("nxdomain", (), f"invalid domain {domain!r}: {exc}"), 0.0
        if not domain or qname == dns.name.root:
            return MxAnswer("nxdomain", (), f"invalid domain {domain!r}"), 0.0
        mx = await self._query(qname, dns.rdatatype.MX)
        if mx.status == "nxdomain":
            return MxAnswer("nxdomain", (), mx.reason), mx.ttl_s
        if mx.status == "error":
            return MxAnswer("temp_fail", (), mx.reason), self._temp_fail_ttl_s
        if mx.status == "nodata":
            return await self._implicit_mx(domain, qname)
        records = sorted({_parse_mx(t) for t in mx.texts})
        if len(records) == 1 and records[0][1] == ".":
            return MxAnswer("null_mx", (), f"{domain} publishes a null MX (RFC 7505)"), mx.ttl_s
        records = [r for r in records if r[1] != "."][: self._max_exchanges]
        if not records:
            reason = f"{domain}: no usable MX exchange"
            return MxAnswer("temp_fail", (), reason), self._temp_fail_ttl_s
        found = await asyncio.gather(
            *(self._addresses(dns.name.from_text(exchange + ".")) for _, exchange in records)
        )
        hosts = []
        failures = []
        ttl_s = mx.ttl_s
        for (pref, exchange), (addresses, addr_ttl_s, why) in zip(records, found, strict=True):
            if addresses:
                hosts.append(MxHost(pref, exchange, addresses))
                ttl_s = min(ttl_s, addr_ttl_s)
            else:
                failures.append(f"{exchange}: {why}")
        if not hosts:
            reason = f"no MX host of {domain} resolves ({'; '.join(failures)})"
            return MxAnswer("temp_fail", (), reason), self._temp_fail_ttl_s
        return MxAnswer("hosts", tuple(hosts), f"MX of {domain}"), ttl_s

    async def _implicit_mx(self, domain: str, qname: dns.name.Name) -> tuple[MxAnswer, float]:
        addresses, ttl_s, why = await self._addresses(qname)
        if addresses:
            host = MxHost(0, domain, addresses)
            return MxAnswer("hosts", (host,), f"{domain} has no MX; implicit MX"), ttl_s
        if why.startswith("temporary"):
            return MxAnswer("temp_fail", (), f"{domain} has no MX; {why}"), self._temp_fail_ttl_s
        return MxAnswer("nxdomain", (), f"{domain} has no MX and no address: {why}"), ttl_s

    async def _addresses(self, qname: dns.name.Name) -> tuple[tuple[str, ...], float, str]:
        """(IPv4 then IPv6 addresses, TTL, why there are none) for one host name."""
        v4, v6 = await asyncio.gather(
            self._query(qname, dns.rdatatype.A), self._query(qname, dns.rdatatype.AAAA)
        )
        addresses = tuple(dict.fromkeys(v4.texts + v6.texts))
        ok = [r for r in (v4, v6) if r.status == "ok"]
        errors = [r.reason for r in (v4, v6) if r.status == "error"]
        if addresses:
            # One family failed: use what we have, but ask again soon.
            ttl_s = min(r.ttl_s for r in ok)
            return addresses, min(ttl_s, self._temp_fail_ttl_s) if errors else ttl_s, ""
        if errors:
            return (), self._temp_fail_ttl_s, "temporary: " + "; ".join(errors)
        return (), min(v4.ttl_s, v6.ttl_s), f"{v4.reason}; {v6.reason}"

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Records:
        what = f"{qname.to_text(omit_final_dot=True)} {dns.rdatatype.to_text(rdtype)}"
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, lifetime=self._timeout_s
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses", {}).values()
            return _Records("nxdomain", (), self._negative_ttl(responses), f"{what}: NXDOMAIN")
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            ttl_s = self._negative_ttl([response] if response is not None else [])
            return _Records("nodata", (), ttl_s, f"{what}: no records")
        except (dns.exception.DNSException, OSError) as exc:
            return _Records("error", (), 0.0, f"{what}: {type(exc).__name__}: {exc}")
        rrset = answer.rrset
        if rrset is None:  # not expected with raise_on_no_answer=True
            return _Records("nodata", (), self._negative_ttl_s, f"{what}: no records")
        return _Records("ok", tuple(rd.to_text() for rd in rrset), float(rrset.ttl), "")

    def _negative_ttl(self, responses: Iterable[dns.message.Message]) -> float:
        """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section."""
        ttls = [
            float(min(rrset.ttl, rrset[0].minimum))
            for response in responses
            for rrset in response.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0
        ]
        return min(ttls) if ttls else self._negative_ttl_s


async def lookup_txt(
    name: str, nameserver: tuple[str, int] | None, timeout_s: float = 5.0
) -> tuple[str, list[str]]:
    """TXT records at `name` for `mqnode dkim check`: ("ok", texts) or (why not, []).

    Each record's strings are joined, as DKIM (RFC 6376 3.6.2.2) and DMARC read them.
    """
    resolver = _make_resolver(nameserver, timeout_s)
    try:
        answer = await resolver.resolve(name, "TXT")
    except dns.resolver.NXDOMAIN:
        return "no such name", []
    except dns.resolver.NoAnswer:
        return "no TXT record", []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return f"DNS lookup failed: {exc}", []
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    return "ok", texts


def _make_resolver(
    nameserver: tuple[str, int] | None, timeout_s: float
) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = []
    else:
        host, port = nameserver
        if not _is_ip(host):
            raise ValueError(f"DNS server must be an IP address, not {host!r}")
        resolver = dns.asyncresolver.Resolver(configure=False)
        # A Nameserver object, not a string: a string takes `resolver.port` as
        # it is at assignment time, and setting `port` later changes nothing.
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.cache = None  # we cache whole answers with our own clock
    resolver.timeout = timeout_s
    resolver.lifetime = timeout_s
    resolver.use_edns(0, 0, 1232)
    return resolver


def _parse_mx(text: str) -> tuple[int, str]:
    pref, exchange = text.split(None, 1)
    exchange = exchange.lower()
    if exchange != ".":
        exchange = exchange.rstrip(".")
    return int(pref), exchange


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _literal(name: str) -> MxAnswer:
    inner = name[1:-1]
    text = inner[5:] if inner.startswith("ipv6:") else inner
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return MxAnswer("nxdomain", (), f"invalid address literal {name}")
    if (address.version == 6) != inner.startswith("ipv6:"):
        return MxAnswer("nxdomain", (), f"invalid address literal {name} (RFC 5321 §4.1.3)")
    host = MxHost(0, str(address), (str(address),))
    return MxAnswer("hosts", (host,), f"address literal {name}")
