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
# OpenDKIM's choice, less what it signs by default that lists and forwarders change.
DKIM_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "reply-to",
    "in-reply-to",
    "references",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
MAX_SMTP_WORKERS = 64


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port out of range in {value!r}")
    return host.strip("[]"), port


def setting(default: Any, help: str, metavar: str | None = None, repeat_as: str = "") -> Any:
    """A NodeConfig field with its one line of help (`mqnode run --help` shows it).

    A list default is copied for each instance. `repeat_as`: a second flag, and the
    flag may be repeated, each adding to the list (any other flag given twice: the
    last wins).
    """
    meta = {"help": help, "metavar": metavar, "repeat_as": repeat_as}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NodeConfig:
    node_id: str = setting("", "this node's name in logs, status and events (required)", "NAME")
    data_dir: str = setting(
        "", "directory for the Raft log, queue state and snapshots (required)", "DIR"
    )
    raft_addr: str = setting("", "HOST:PORT for Raft traffic between the members (required)")
    # Read at the first start only: from then on the node keeps the member list in its
    # data dir (changed by `mqnode cluster add-node` / `remove-node`), and a different
    # `peers` only earns a warning in the log.
    peers: list[str] = setting(
        [], "the other members' raft_addr, comma-separated (first start only)", "ADDRS"
    )
    # Ignored once the node has been contacted.
    join: bool = setting(
        False, "join a running cluster (peers = its members); no election until added"
    )
    smtp_addr: str = setting("127.0.0.1:2525", "HOST:PORT of the SMTP listener")
    admin_addr: str = setting("127.0.0.1:8025", "HOST:PORT of the admin HTTP endpoint")
    cluster_secret_file: str = setting(
        "", "file holding the secret shared by all members, mode 600 (required)", "FILE"
    )
    # Empty: the node makes <data_dir>/admin.token (mode 600) on first start and uses that.
    admin_token_file: str = setting(
        "", "bearer token for the admin API; empty: DATA_DIR/admin.token", "FILE"
    )
    relay_host: str = setting("", "HOST:PORT to send all mail to; empty: the domains' MX hosts")
    # With it the relay must offer STARTTLS (or relay_implicit_tls) with a certificate that
    # verifies against relay_tls_ca_file (empty: the system's CAs) and names relay_host.
    relay_auth_file: str = setting(
        "", "USER:PASSWORD for relay_host, one line, mode 600 (needs TLS)", "FILE"
    )
    relay_tls_ca_file: str = setting(
        "", "CAs (PEM) the relay's certificate must chain to; empty: the system's", "FILE"
    )
    relay_implicit_tls: bool = setting(False, "the relay speaks TLS from the first byte (465)")
    dns_server: str = setting("", "IP:PORT of the DNS server for MX lookups; empty: the system's")
    hostname: str = setting("mqnode.localdomain", "name in the SMTP greeting, EHLO and Received")
    allowed_networks: list[str] = setting(
        ["127.0.0.0/8", "::1/128"], "client networks that may relay without AUTH", "NETS"
    )
    max_message_bytes: int = setting(DEFAULT_MAX_MESSAGE_BYTES, "largest message accepted (552)")
    max_recipients: int = setting(1000, "recipients per message (452 beyond)")
    commit_timeout_ms: int = setting(10_000, "how long a submission waits for its commit (451)")
    max_pending_commits: int = setting(2000, "submissions waiting for a commit (451 beyond)")
    election_timeout_min_ms: int = setting(400, "Raft election timeout, lower bound")
    election_timeout_max_ms: int = setting(1400, "Raft election timeout, upper bound")
    heartbeat_ms: int = setting(100, "leader heartbeat; at most half the minimum election timeout")
    # The first after a quiet spell goes at once: fewer, larger appends, fsyncs and acks.
    replication_batch_ms: int = setting(4, "while busy, send new entries at most this often")
    leader_fallback_ms: int = setting(3000, "a leader without a majority's answers steps down")
    log_compaction_min_entries: int = setting(2000, "Raft log entries before a snapshot (at least)")
    log_compaction_min_time_s: int = setting(300, "seconds between snapshots (at least)")
    state_map_size_mb: int = setting(4096, "queue state size limit; ingress refuses when full")
    raft_map_size_mb: int = setting(4096, "Raft log size limit")
    # Off: a queue-only node, and tests that must not resolve or connect anywhere.
    delivery_enabled: bool = setting(True, "deliver mail (off: accept and replicate only)")
    delivery_concurrency: int = setting(20, "SMTP delivery sessions at once, all destinations")
    per_destination_concurrency: int = setting(10, "sessions at once to one destination")
    # Feedback moves it towards 1 or the above (Postfix's initial_destination_concurrency).
    initial_destination_concurrency: int = setting(5, "sessions a destination starts with")
    # A receiver known to take few connections (Postfix: a transport of its own).
    destination_concurrency_limits: list[str] = setting(
        [], "DOMAIN=N entries: a domain's own session limit", "LIST"
    )
    # Postfix's smtp_destination_recipient_limit.
    delivery_recipient_limit: int = setting(50, "recipients per SMTP transaction")
    delivery_port: int = setting(25, "port of the MX hosts")
    delivery_timeout_s: int = setting(60, "timeout of each SMTP step of a delivery")
    dns_timeout_ms: int = setting(5000, "timeout of one DNS lookup")
    tls_required_domains: list[str] = setting(
        [], "domains whose mail needs verified TLS (else deferred)", "DOMAINS"
    )
    # Postfix's `verify` level: the MX host's certificate must chain to these and name it.
    tls_required_ca_file: str = setting(
        "", "CAs (PEM) for tls_required_domains; empty: the system's", "FILE"
    )
    retry_base_s: int = setting(300, "first retry after this; doubles each attempt")
    retry_max_s: int = setting(4000, "longest wait between retries")
    max_queue_lifetime_s: int = setting(5 * 86400, "bounce mail still undelivered after this")
    # mqnode/delivery/bounce_rules.toml documents the format; re-read on SIGHUP.
    bounce_rules_file: str = setting(
        "", "bounce classification rules, read before the shipped ones", "FILE"
    )
    # delivery/auto_suppress.py: a bounce of these categories suppresses the address.
    suppress_bounces: list[str] = setting(
        ["invalid-recipient:30", "bad-domain:30", "inactive-mailbox:30"],
        "bounce categories that suppress the address, CATEGORY:DAYS (0 days: for good)",
        "LIST",
    )
    suppress_bounce_exempt_domains: list[str] = setting(
        [], "sending domains whose bounces suppress nothing", "DOMAINS"
    )
    suppression_action: str = setting(
        "refuse", "suppressed recipients: refuse (550 at RCPT TO) or drop (accept, send none)"
    )
    lease_ms: int = setting(3000, "dispatch lease of the leader")
    lease_margin_ms: int = setting(500, "stop dispatching this long before the lease ends")
    # TLS cert+key enable STARTTLS (and smtps_addr, implicit TLS, RFC 8314); a users file
    # (USER:scrypt$... lines, see mqnode/smtp/auth.py) enables AUTH PLAIN/LOGIN after TLS;
    # authenticated users may relay from any network.
    smtp_tls_cert: str = setting("", "certificate (PEM) for STARTTLS and smtps_addr", "FILE")
    smtp_tls_key: str = setting("", "private key (PEM) of smtp_tls_cert", "FILE")
    smtp_users_file: str = setting("", "AUTH users, USER:scrypt$... lines (needs TLS)", "FILE")
    smtps_addr: str = setting("", "HOST:PORT of an implicit-TLS listener (RFC 8314)")
    # Per client IP (an IPv6 client per /64): 421 4.7.0 / 450 4.7.1 beyond these.
    client_connection_rate_per_min: int = setting(600, "connections per minute per client")
    client_message_rate_per_min: int = setting(6000, "messages per minute per client")
    client_max_connections: int = setting(100, "connections at once per client")
    client_limit_exceptions: list[str] = setting(
        ["127.0.0.0/8", "::1/128"], "client networks exempt from those limits", "NETS"
    )
    # Per session: 552 5.3.4 / 421 4.7.0 / 421 4.4.2 beyond these.
    max_header_count: int = setting(1000, "header fields per message")
    # 554 5.4.6 for a message with this many Received fields or more, as Postfix.
    hopcount_limit: int = setting(50, "refuse a message with this many Received fields (a loop)")
    max_commands_per_session: int = setting(10_000, "SMTP commands per session")
    smtp_idle_timeout_s: int = setting(300, "close an SMTP session idle this long")
    # Each worker is an interpreter of its own: set it to the cores the node may use
    # beyond one, so SMTP parsing does not compete with Raft for one lock.
    smtp_workers: int = setting(0, "SMTP worker processes (0: sessions in the node's process)")
    # DKIM (mqnode/signing): every message from a domain with a key leaves signed by it.
    dkim_keys: list[str] = setting(
        [], "DOMAIN:SELECTOR:KEY_FILE: a PEM RSA or Ed25519 key, mode 600", "KEYS", "--dkim-key"
    )
    dkim_headers: list[str] = setting(
        list(DKIM_HEADERS), "header fields signed when present (From is always)", "LIST"
    )
    dkim_expire_s: int = setting(0, "signatures expire this long after receipt (x=); 0: never")
    dkim_parent_domains: bool = setting(
        False, "sign mail from a subdomain with its parent domain's key"
    )
    dkim_default_domain: str = setting(
        "", "sign mail from domains without a key with this domain's key", "DOMAIN"
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", "LEVEL")
    fault_injection: bool = setting(False, "tests only: expose POST /fault/partition")
    event_log: str = setting("", 'JSON line per queue event: a file, "-" for stderr', "FILE")
    event_webhook: str = setting("", "POST the events (JSON arrays) to this URL", "URL")
    # The HTTP injection API (api/server.py) is always served on admin_addr; here it also
    # gets a listener of its own, e.g. on an address applications reach and admins do not.
    api_addr: str = setting(
        "", "HOST:PORT of the HTTP injection API's own listener; empty: admin_addr only"
    )
    api_tls_cert: str = setting("", "certificate (PEM): api_addr speaks HTTPS", "FILE")
    api_tls_key: str = setting("", "private key (PEM) of api_tls_cert", "FILE")
    api_max_batch: int = setting(1000, "recipients of one batch request at most (each a message)")
    # Principals and roles (access/principals.py); the admin token stays an admin principal.
    principals_file: str = setting(
        "", "principals (name, hashed key, roles), TOML, mode 600; read again on SIGHUP", "FILE"
    )
    public_status: bool = setting(True, "/status and /metrics answer without credentials")
    audit_keep_days: int = setting(400, "days the audit trail keeps a record")

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
        if self.suppression_action not in ("refuse", "drop"):
            raise ConfigError("suppression_action: refuse or drop")
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
            "hopcount_limit",
            "max_commands_per_session",
            "smtp_idle_timeout_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0")
        if self.dkim_expire_s < 0:
            raise ConfigError("dkim_expire_s: must be >= 0")
        if any(not h.isascii() or not h.strip() or ":" in h for h in self.dkim_headers):
            raise ConfigError("dkim_headers: header field names, comma-separated")
        if not 0 <= self.smtp_workers <= MAX_SMTP_WORKERS:
            raise ConfigError(f"smtp_workers: must be 0..{MAX_SMTP_WORKERS}")
        if bool(self.smtp_tls_cert) != bool(self.smtp_tls_key):
            raise ConfigError("smtp_tls_cert: smtp_tls_cert and smtp_tls_key go together")
        if self.smtp_users_file and not self.smtp_tls_cert:
            raise ConfigError(
                "smtp_users_file: AUTH is only offered over TLS; set smtp_tls_cert and smtp_tls_key"
            )
        if bool(self.api_tls_cert) != bool(self.api_tls_key):
            raise ConfigError("api_tls_cert: api_tls_cert and api_tls_key go together")
        if self.api_tls_cert and not self.api_addr:
            raise ConfigError("api_tls_cert: needs api_addr (the admin endpoint has no TLS)")
        if self.api_addr:
            parse_hostport(self.api_addr, "api_addr")
            if self.api_addr in (self.smtp_addr, self.admin_addr, self.raft_addr, self.smtps_addr):
                raise ConfigError("api_addr: must differ from the other listen addresses")
        if not 1 <= self.api_max_batch <= 100_000:
            raise ConfigError("api_max_batch: must be 1..100000")
        if not 1 <= self.audit_keep_days <= 36_500:
            raise ConfigError("audit_keep_days: must be 1..36500")
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
        return _read_private(Path(self.cluster_secret_file), "cluster_secret_file")

    def relay_login(self) -> tuple[str, str] | None:
        """(user, password) from relay_auth_file, None without one; ConfigError if unusable."""
        if not self.relay_auth_file:
            return None
        path = Path(self.relay_auth_file)
        lines = read_owner_only(path, "relay_auth_file").splitlines()
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
        return _read_private(path, "admin_token_file")

    @property
    def data_path(self) -> Path:
        return Path(os.path.abspath(self.data_dir))


# Group and world bits: every file holding a secret (cluster secret, admin token, relay
# login, SMTP users) must be readable by its owner alone, mode 600 or 400.
_NOT_OWNER = 0o077


def read_owner_only(path: Path, key: str) -> str:
    """A file holding a secret, which only its owner may read; ConfigError else."""
    try:
        st = path.stat()
        value = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from exc
    if st.st_mode & _NOT_OWNER:
        raise ConfigError(
            f"{key}: {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
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


def _read_private(path: Path, key: str) -> str:
    """A secret from a file only its owner may read; at least 16 characters."""
    value = read_owner_only(path, key).strip()
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
        return _boolean(key, value)
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


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _boolean(key: str, value: Any) -> bool:
    """true/false in TOML; 1/0 too (the form of earlier releases), and yes/no/on/off as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{key}: expected true or false (or 1/0), got {value!r}")
