"""NodeConfig: one node's settings, from a TOML file and/or command-line flags.

Flags and TOML keys are the same names (`--raft-addr` == `raft_addr`); flags
win. `validate()` is the only place settings are checked, and it names the
offending key in one line (the CLI turns that into exit code 2).

Settings with units carry them in the name: `*_ms`, `*_s`, `*_bytes`, `*_mb`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mqnode.errors import ConfigError

DEFAULT_MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_SMTP_WORKERS = 64


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port out of range in {value!r}")
    return host.strip("[]"), port


@dataclass
class NodeConfig:
    node_id: str = ""
    data_dir: str = ""
    raft_addr: str = ""
    # The other members' raft_addr. Read at the first start only: from then on the node
    # keeps the member list in its data dir (changed by `mqnode cluster add-node` /
    # `remove-node`), and a different `peers` only earns a warning in the log.
    peers: list[str] = field(default_factory=list)
    # 1: this node joins a running cluster (peers = its current members) and starts no
    # election until the leader adds it. Ignored once the node has been contacted.
    join: int = 0
    smtp_addr: str = "127.0.0.1:2525"
    admin_addr: str = "127.0.0.1:8025"
    cluster_secret_file: str = ""
    # Bearer token for the admin API's queue and Raft operations; empty: the node makes
    # <data_dir>/admin.token (mode 600) on first start and uses that.
    admin_token_file: str = ""
    relay_host: str = ""
    # A login for relay_host: a file (mode 600) with one line USER:PASSWORD. With it the
    # relay must offer STARTTLS (or relay_implicit_tls) with a certificate that verifies
    # against relay_tls_ca_file (empty: the system's CAs) and names relay_host.
    relay_auth_file: str = ""
    relay_tls_ca_file: str = ""
    # 1: the relay speaks TLS from the first byte (port 465) instead of STARTTLS.
    relay_implicit_tls: int = 0
    dns_server: str = ""
    hostname: str = "mqnode.localdomain"
    allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_recipients: int = 1000
    commit_timeout_ms: int = 10_000
    max_pending_commits: int = 2000
    election_timeout_min_ms: int = 400
    election_timeout_max_ms: int = 1400
    heartbeat_ms: int = 100
    # The leader sends new entries to followers at most once per this many ms while busy
    # (the first after a quiet spell goes at once): fewer, larger appends, fsyncs and acks.
    replication_batch_ms: int = 4
    leader_fallback_ms: int = 3000
    log_compaction_min_entries: int = 2000
    log_compaction_min_time_s: int = 300
    state_map_size_mb: int = 4096
    raft_map_size_mb: int = 1024
    # 0: accept and replicate only, never dispatch (a queue-only node, and tests that must
    # not resolve or connect anywhere).
    delivery_enabled: int = 1
    delivery_concurrency: int = 20
    per_destination_concurrency: int = 10
    # Sessions a destination starts with; feedback moves it towards 1 or the above
    # (Postfix's initial_destination_concurrency).
    initial_destination_concurrency: int = 5
    # "domain=N": a recipient domain's own limit instead of per_destination_concurrency
    # (a receiver known to take few connections; Postfix: a transport of its own).
    destination_concurrency_limits: list[str] = field(default_factory=list)
    # Recipients per SMTP transaction (Postfix's smtp_destination_recipient_limit).
    delivery_recipient_limit: int = 50
    delivery_port: int = 25
    delivery_timeout_s: int = 60
    dns_timeout_ms: int = 5000
    tls_required_domains: list[str] = field(default_factory=list)
    # Mail for tls_required_domains: the MX host's certificate must chain to these CAs
    # (PEM; empty: the system's) and name the MX host (Postfix's `verify` level).
    tls_required_ca_file: str = ""
    retry_base_s: int = 300
    retry_max_s: int = 4000
    max_queue_lifetime_s: int = 5 * 86400
    lease_ms: int = 3000
    lease_margin_ms: int = 500
    # SMTP submission security. TLS cert+key enable STARTTLS (and smtps_addr, implicit TLS,
    # RFC 8314); a users file (USER:scrypt$... lines, see mqnode/smtp/auth.py) enables AUTH
    # PLAIN/LOGIN after TLS; authenticated users may relay from any network.
    smtp_tls_cert: str = ""
    smtp_tls_key: str = ""
    smtp_users_file: str = ""
    smtps_addr: str = ""
    # Per client IP (an IPv6 client per /64): 421 4.7.0 / 450 4.7.1 beyond these.
    client_connection_rate_per_min: int = 600
    client_message_rate_per_min: int = 6000
    client_max_connections: int = 100
    client_limit_exceptions: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Per session: 552 5.3.4 / 421 4.7.0 / 421 4.4.2 beyond these.
    max_header_count: int = 1000
    max_commands_per_session: int = 10_000
    smtp_idle_timeout_s: int = 300
    # SMTP sessions in this many worker processes beside the node's (0: in the node's
    # own process). Each worker is an interpreter of its own: set it to the cores the
    # node may use beyond one, so SMTP parsing does not compete with Raft for one lock.
    smtp_workers: int = 0
    log_level: str = "INFO"
    # Test-only: 1 exposes POST /fault/partition on the admin endpoint.
    fault_injection: int = 0
    # JSON event log (one line per queue event): a file path, "-" for stderr, "" for none.
    event_log: str = ""
    # POST those events (JSON arrays) to this URL, retried with backoff; "" for none.
    event_webhook: str = ""

    # --- loading -----------------------------------------------------------

    @classmethod
    def load(cls, config_file: str | None, overrides: dict[str, Any]) -> NodeConfig:
        values: dict[str, Any] = {}
        if config_file:
            try:
                with open(config_file, "rb") as fh:
                    values = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"--config: cannot read {config_file}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"--config: {config_file} is not valid TOML: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        cfg = cls()
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}")
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
        cfg.validate()
        return cfg

    # --- checking ----------------------------------------------------------

    def validate(self) -> None:
        if not self.node_id or not self.node_id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("node_id: required, letters/digits/-/_ only")
        if not self.data_dir:
            raise ConfigError("data_dir: required")
        for key in ("raft_addr", "smtp_addr", "admin_addr"):
            parse_hostport(getattr(self, key), key)
        for peer in self.peers:
            parse_hostport(peer, "peers")
        if self.raft_addr in self.peers:
            raise ConfigError("peers: must not contain this node's own raft_addr")
        if len(set(self.peers)) != len(self.peers):
            raise ConfigError("peers: duplicate entry")
        if self.join not in (0, 1):
            raise ConfigError("join: 0 or 1")
        if self.join and not self.peers:
            raise ConfigError("join: needs peers, the raft_addr of the cluster's current members")
        for key in ("relay_host", "dns_server"):
            if getattr(self, key):
                parse_hostport(getattr(self, key), key)
        if (self.relay_auth_file or self.relay_tls_ca_file) and not self.relay_host:
            raise ConfigError("relay_auth_file, relay_tls_ca_file: need relay_host")
        for key in ("relay_tls_ca_file", "relay_implicit_tls"):
            if getattr(self, key) and not self.relay_auth_file:
                raise ConfigError(
                    f"{key}: only used with relay_auth_file (a relay without a "
                    "login gets opportunistic STARTTLS)"
                )
        if self.relay_implicit_tls not in (0, 1):
            raise ConfigError("relay_implicit_tls: 0 or 1")
        if not self.cluster_secret_file:
            raise ConfigError(
                "cluster_secret_file: required; the Raft port runs code from anyone who "
                "can reach it unless traffic is encrypted with a shared secret"
            )
        for net in self.client_limit_exceptions:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"client_limit_exceptions: {exc}") from exc
        self.destination_limits()  # raises ConfigError for a bad entry
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"allowed_networks: {exc}") from exc
        positive = (
            "max_message_bytes",
            "max_recipients",
            "commit_timeout_ms",
            "max_pending_commits",
            "heartbeat_ms",
            "log_compaction_min_entries",
            "state_map_size_mb",
            "raft_map_size_mb",
            "delivery_concurrency",
            "per_destination_concurrency",
            "initial_destination_concurrency",
            "delivery_recipient_limit",
            "delivery_port",
            "delivery_timeout_s",
            "dns_timeout_ms",
            "retry_base_s",
            "retry_max_s",
            "max_queue_lifetime_s",
            "lease_ms",
            "lease_margin_ms",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0")
        if not self.election_timeout_min_ms < self.election_timeout_max_ms:
            raise ConfigError("election_timeout_min_ms: must be below election_timeout_max_ms")
        if self.lease_margin_ms * 2 >= self.lease_ms:
            raise ConfigError("lease_margin_ms: must be below half of lease_ms")
        if self.dns_server:
            host = parse_hostport(self.dns_server, "dns_server")[0]
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ConfigError("dns_server: must be an IP address and port") from exc
        if self.heartbeat_ms * 2 > self.election_timeout_min_ms:
            raise ConfigError("heartbeat_ms: must be at most half of election_timeout_min_ms")
        if not 0 <= self.replication_batch_ms < self.heartbeat_ms:
            raise ConfigError("replication_batch_ms: must be >= 0 and below heartbeat_ms")
        for key in (
            "client_connection_rate_per_min",
            "client_message_rate_per_min",
            "client_max_connections",
            "max_header_count",
            "max_commands_per_session",
            "smtp_idle_timeout_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0")
        if not 0 <= self.smtp_workers <= MAX_SMTP_WORKERS:
            raise ConfigError(f"smtp_workers: must be 0..{MAX_SMTP_WORKERS}")
        if bool(self.smtp_tls_cert) != bool(self.smtp_tls_key):
            raise ConfigError("smtp_tls_cert: smtp_tls_cert and smtp_tls_key go together")
        if self.smtp_users_file and not self.smtp_tls_cert:
            raise ConfigError(
                "smtp_users_file: AUTH is only offered over TLS; set smtp_tls_cert and smtp_tls_key"
            )
        if self.smtps_addr:
            if not self.smtp_tls_cert:
                raise ConfigError("smtps_addr: needs smtp_tls_cert and smtp_tls_key")
            parse_hostport(self.smtps_addr, "smtps_addr")
            if self.smtps_addr in (self.smtp_addr, self.admin_addr, self.raft_addr):
                raise ConfigError("smtps_addr: must differ from the other listen addresses")

    def destination_limits(self) -> dict[str, int]:
        """Recipient domain -> its own per-destination limit (ConfigError if malformed)."""
        return parse_destination_limits(self.destination_concurrency_limits)

    def read_secret(self) -> str:
        """The cluster secret; refuse empty or world-readable files."""
        return _read_private(Path(self.cluster_secret_file), "cluster_secret_file", 0o007)

    def relay_login(self) -> tuple[str, str] | None:
        """(user, password) from relay_auth_file, None without one; ConfigError if unusable."""
        if not self.relay_auth_file:
            return None
        path = Path(self.relay_auth_file)
        lines = _read_owned(path, "relay_auth_file", 0o077).splitlines()
        user, sep, password = (lines[0] if lines else "").partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"relay_auth_file: {path} must hold one line USER:PASSWORD")
        return user.strip(), password

    def admin_token(self) -> str:
        """The admin token, creating <data_dir>/admin.token when none is configured."""
        path = Path(self.admin_token_file) if self.admin_token_file else None
        if path is None:
            path = self.data_path / "admin.token"
            if not path.exists():
                self.data_path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(24) + "\n")
        return _read_private(path, "admin_token_file", 0o077)

    @property
    def data_path(self) -> Path:
        return Path(os.path.abspath(self.data_dir))


def _read_owned(path: Path, key: str, forbidden_mode: int) -> str:
    """A file only its owner (and, per mode, group) may read; ConfigError else."""
    try:
        st = path.stat()
        value = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from exc
    if st.st_mode & forbidden_mode:
        raise ConfigError(f"{key}: {path} is readable by others; chmod 600 it")
    return value


def parse_destination_limits(entries: list[str]) -> dict[str, int]:
    """`destination_concurrency_limits` entries ("domain=N", N > 0) as domain -> N."""
    limits: dict[str, int] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        name = name.strip().lower().rstrip(".")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise ConfigError(
                f"destination_concurrency_limits: {entry!r} is not DOMAIN=N with N > 0"
            )
        if name in limits:
            raise ConfigError(f"destination_concurrency_limits: {name} given twice")
        limits[name] = int(value)
    return limits


def _read_private(path: Path, key: str, forbidden_mode: int) -> str:
    """A secret from a file that only its owner (and, per mode, group) may read; >= 16 chars."""
    value = _read_owned(path, key, forbidden_mode).strip()
    if len(value) < 16:
        raise ConfigError(f"{key}: the secret in {path} must be at least 16 characters")
    return value


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{key}: expected a list of strings or a comma-separated string")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from exc
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string")
    return value
