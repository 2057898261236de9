"""Router: where mail for a domain goes — the relay host, or the domain's MX hosts.

Outcomes of a lookup (RFC 5321 5.1, RFC 7505):
    targets  addresses to try in order (MX preference, then A/AAAA order)
    bounce   null MX (5.1.10) or no such domain (5.1.2): final for these recipients
    defer    DNS temporary failure (4.4.3): retry later

`delivery_port` is 25 in production; tests point MX hosts at loopback sinks
on another port.
"""

from __future__ import annotations

from dataclasses import dataclass

from .delivery import Target
from .mx import MxResolver


@dataclass(frozen=True)
class Route:
    kind: str  # "targets" | "bounce" | "defer"
    targets: tuple[Target, ...] = ()
    status: str = ""
    reason: str = ""


class Router:
    def __init__(
        self,
        relay: tuple[str, int] | None,
        resolver: MxResolver | None,
        delivery_port: int,
        relay_secure: bool = False,
    ) -> None:
        if relay is None and resolver is None:
            raise ValueError("a router needs a relay host or an MX resolver")
        self._relay = relay
        self._relay_secure = relay_secure  # verified TLS and a login (delivery.RelayAuth)
        self._resolver = resolver
        self._port = delivery_port

    async def route(self, domain: str) -> Route:
        if self._relay is not None:
            host, port = self._relay
            return Route("targets", (Target(host, host, port, secure=self._relay_secure),))
        assert self._resolver is not None
        answer = await self._resolver.resolve(domain)
        if answer.kind == "hosts":
            targets = tuple(
                Target(h.name, addr, self._port) for h in answer.hosts for addr in h.addresses
            )
            return Route("targets", targets)
        if answer.kind == "null_mx":
            return Route(
                "bounce", status="5.1.10", reason=f"{domain}: domain accepts no mail (null MX)"
            )
        if answer.kind == "nxdomain":
            return Route("bounce", status="5.1.2", reason=f"{domain}: {answer.reason}")
        return Route(
            "defer", status="4.4.3", reason=f"{domain}: DNS lookup failed: {answer.reason}"
        )
