"""NodeMetrics: Prometheus metrics for one node; the only module importing prometheus_client.

Exposed on the admin endpoint as `GET /metrics`. Per-node registry (no
module-level singletons). Two kinds:
* histograms observed as things happen: `mqnode_commit_seconds` (submit to
  commit+apply, per command) and `mqnode_delivery_seconds` (one SMTP attempt);
* values read at scrape time from a `MetricsSnapshot` the node builds: queue
  depth by state and by recipient domain (the first `DOMAIN_SCAN_LIMIT`
  messages), SMTP replies, delivery outcomes, Raft term/role/commit/applied,
  quorum, lease, and replication lag per peer (leader only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DOMAIN_SCAN_LIMIT = 10_000
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class MetricsSnapshot:
    queue_by_state: dict[str, int]
    queue_by_domain: dict[str, int]
    smtp_accepted: int
    smtp_refused: int
    outcomes: dict[str, int]
    role: str
    term: int
    commit_index: int
    last_applied: int
    has_quorum: bool
    lease_held: bool
    store_fill_ratio: float = 0.0
    replication_lag: dict[str, int] = field(default_factory=dict)
    destinations_suspended: int = 0
    dkim_signed: dict[str, int] = field(default_factory=dict)
    dkim_failures: int = 0
    # (outcome, bounce category, site) -> recipients: the deferred and bounced ones
    bounce_categories: dict[tuple[str, str, str], int] = field(default_factory=dict)
    sites: list[dict[str, Any]] = field(default_factory=list)  # Shaper.describe
    suppressed_refused: int = 0  # recipients refused at RCPT TO because suppressed
    suppression_entries: int = 0
    api_accepted: int = 0  # messages queued through the HTTP API
    api_refused: int = 0  # API requests refused (4xx, 503)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        g = GaugeMetricFamily("mqnode_queue_messages", "Messages queued", labels=["state"])
        for state, n in s.queue_by_state.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(
            "mqnode_queue_domain_messages", "Queued messages by recipient domain", labels=["domain"]
        )
        for domain, n in s.queue_by_domain.items():
            g.add_metric([domain], n)
        yield g
        c = CounterMetricFamily(
            "mqnode_dkim_signed_messages", "Messages DKIM-signed at ingress", labels=["domain"]
        )
        for domain, n in s.dkim_signed.items():
            c.add_metric([domain], n)
        yield c
        yield CounterMetricFamily(
            "mqnode_dkim_failures", "Messages refused because signing failed", value=s.dkim_failures
        )
        c = CounterMetricFamily("mqnode_smtp_messages", "SMTP DATA replies", labels=["result"])
        c.add_metric(["accepted"], s.smtp_accepted)
        c.add_metric(["refused"], s.smtp_refused)
        yield c
        c = CounterMetricFamily(
            "mqnode_api_messages",
            "HTTP API: messages queued, and requests refused",
            labels=["result"],
        )
        c.add_metric(["accepted"], s.api_accepted)
        c.add_metric(["refused"], s.api_refused)
        yield c
        c = CounterMetricFamily(
            "mqnode_delivery_recipients", "Per-recipient delivery outcomes", labels=["outcome"]
        )
        for outcome, n in s.outcomes.items():
            c.add_metric([outcome], n)
        yield c
        c = CounterMetricFamily(
            "mqnode_delivery_failures",
            "Deferred and bounced recipients by bounce category and shaping site",
            labels=["outcome", "category", "site"],
        )
        for (outcome, category, site), n in sorted(s.bounce_categories.items()):
            c.add_metric([outcome, category, site], n)
        yield c
        g = GaugeMetricFamily(
            "mqnode_shaping_site_rate", "A site's message rate now, per second", labels=["site"]
        )
        for site_view in s.sites:
            g.add_metric([site_view["site"]], site_view["per_s"])
        yield g
        g = GaugeMetricFamily(
            "mqnode_shaping_site_suspended",
            "1 while a site is suspended after repeated throttling",
            labels=["site"],
        )
        for site_view in s.sites:
            g.add_metric([site_view["site"]], 1.0 if site_view["suspended_for_s"] else 0.0)
        yield g
        yield CounterMetricFamily(
            "mqnode_suppressed_recipients",
            "Recipients refused at RCPT TO because they are on the suppression list",
            value=s.suppressed_refused,
        )
        yield GaugeMetricFamily(
            "mqnode_suppression_entries",
            "Entries in the suppression list",
            value=s.suppression_entries,
        )
        g = GaugeMetricFamily("mqnode_raft_role", "1 for this node's current role", labels=["role"])
        for role in ("leader", "follower", "candidate"):
            g.add_metric([role], 1.0 if s.role == role else 0.0)
        yield g
        yield GaugeMetricFamily("mqnode_raft_term", "Current Raft term", value=s.term)
        yield GaugeMetricFamily("mqnode_raft_commit_index", "Commit index", value=s.commit_index)
        yield GaugeMetricFamily("mqnode_raft_applied_index", "Last applied", value=s.last_applied)
        yield GaugeMetricFamily("mqnode_raft_quorum", "1 with a quorum", value=int(s.has_quorum))
        yield GaugeMetricFamily(
            "mqnode_lease_held", "1 while holding the lease", value=int(s.lease_held)
        )
        yield GaugeMetricFamily(
            "mqnode_store_fill_ratio",
            "Queue store pages in use over its map size (mail is refused with 452 at 0.9)",
            value=s.store_fill_ratio,
        )
        yield GaugeMetricFamily(
            "mqnode_delivery_destinations_suspended",
            "Destinations whose mail is deferred without trying (a cohort of sessions failed)",
            value=s.destinations_suspended,
        )
        g = GaugeMetricFamily(
            "mqnode_raft_replication_lag_entries", "Commit index minus peer match", labels=["peer"]
        )
        for peer, lag in s.replication_lag.items():
            g.add_metric([peer], lag)
        yield g


class NodeMetrics:
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_seconds = Histogram(
            "mqnode_commit_seconds",
            "Submit to committed and applied, per command",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "mqnode_delivery_seconds",
            "One delivery attempt of one message",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
