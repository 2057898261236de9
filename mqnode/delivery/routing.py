"""Router: where mail for a domain goes — the relay host, or the domain's MX hosts.

A destination ("nexthop") is what per-destination limits count and what one
SMTP transaction carries: the relay host when there is one (all mail goes
there: Postfix counts its relayhost as one nexthop too), else the recipient
domain.

Outcomes of a lookup (RFC 5321 5.1, RFC 7505):
    targets  addresses to try in order (MX preference, then A/AAAA order)
    bounce   null MX (5.1.10) or no such domain (5.1.2): final for these recipients
    defer    DNS temporary failure (4.4.3): retry later

`delivery_port` is 25 in production; tests point MX hosts at loopback sinks
on another port.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqnode.delivery.client import Target
from mqnode.delivery.mx import MxResolver


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

    @property
    def one_destination(self) -> bool:
        """All mail goes to one place (the relay host)."""
        return self._relay is not None

    def nexthop(self, domain: str) -> str:
        """The destination of mail for `domain` (see the module docstring)."""
        if self._relay is not None:
            host, port = self._relay
            return f"[{host}]:{port}"
        return domain

    async def route(self, nexthop: str) -> Route:
        """Where to send mail for `nexthop` (a domain when there is no relay host)."""
        if self._relay is not None:
            host, port = self._relay
            return Route("targets", (Target(host, host, port, secure=self._relay_secure),))
        assert self._resolver is not None
        domain = nexthop
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
