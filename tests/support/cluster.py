"""Cluster: N real `mqnode run` processes on 127.0.0.1 for integration and fault tests.

Modelled on rqlite's system_test helpers. Each node gets free loopback ports
(Raft, SMTP, admin), its own data dir and log file under one base dir, and is
started as `sys.executable -m mqnode.cli run ...` so it runs inside whatever
venv runs the tests.

Promises:
* Every process started here is stopped by PID: `stop()` sends SIGCONT (a
  paused node cannot act on SIGTERM), then SIGTERM, then SIGKILL after a grace
  period. Use the context manager (or the pytest fixtures) so it always runs.
* Every wait is a bounded poll. A failed wait raises `ClusterError` (an
  AssertionError) whose message says what was expected, what was seen last,
  and the tail of each node's log.
* Ports are fixed per node for the cluster's life, so `restart(i)` brings a
  node back at the same addresses with the same data dir.
* A node's command line is fixed when the node is made: its `--peers` are the
  other nodes of the cluster as first started, or, for a node made later by
  `add_node()`, the members it was told about (`--join`). Restarts reuse
  that command line, as a service manager would, even after membership changed.

Limits: loopback only; ports are found by binding port 0 and releasing it, so
another process could take one in between (a node then fails to start and the
error shows its log).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mqnode.devtools.localports import free_loopback_ports

from .netlab import NetLab

HOST = "127.0.0.1"
SECRET = "integration-test-cluster-secret-0123456789"
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 25
POLL_S = 0.1

# Short timeouts so elections and the no-majority answer are quick in tests.
FAST_TUNING: tuple[str, ...] = (
    "--election-timeout-min-ms",
    "300",
    "--election-timeout-max-ms",
    "600",
    "--heartbeat-ms",
    "60",
    "--commit-timeout-ms",
    "3000",
)

# For tests that assert no election happens: a leader whose process is starved of CPU
# for a third of a second (two cores shared with a parallel test run) would otherwise
# lose a legitimate election under FAST_TUNING and fail a test about something else.
STEADY_TUNING: tuple[str, ...] = (
    "--election-timeout-min-ms",
    "1000",
    "--election-timeout-max-ms",
    "2000",
    "--heartbeat-ms",
    "100",
    "--commit-timeout-ms",
    "3000",
)

# Small limits, so 552/452 are cheap to provoke (the 5 MiB test body still fits).
TEST_MAX_MESSAGE_BYTES = 5 * 1024 * 1024 + 64 * 1024
TEST_MAX_RECIPIENTS = 5
LIMITS_TUNING: tuple[str, ...] = (
    *FAST_TUNING,
    "--max-message-bytes",
    str(TEST_MAX_MESSAGE_BYTES),
    "--max-recipients",
    str(TEST_MAX_RECIPIENTS),
)

T = TypeVar("T")


class ClusterError(AssertionError):
    """A cluster wait or admin call failed; the message carries the node logs."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (see mqnode.devtools.localports)."""
    return free_loopback_ports(count)


ADMIN_TOKEN = "integration-test-admin-token-0123456789"


def http_request(
    port: int,
    method: str,
    path: str,
    auth: str | None,
    body: bytes | None = None,
    timeout_s: float = 15.0,
    host: str = HOST,
) -> tuple[int, bytes]:
    """One request to host:port with any method, auth header and body; (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(url: str, timeout_s: float = 3.0) -> bytes:
    """GET with the test admin token; raises urllib.error.HTTPError / OSError."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        data: bytes = resp.read()
    return data


def http_get_json(url: str, timeout_s: float = 3.0) -> Any:
    """GET a JSON document; raises urllib.error.HTTPError / OSError / ValueError."""
    return json.loads(http_get(url, timeout_s).decode("utf-8"))


@dataclass
class NodeProc:
    """One node's fixed identity and its current process (if any)."""

    index: int
    node_id: str
    raft_port: int
    smtp_port: int
    admin_port: int
    data_dir: Path
    log_path: Path
    peers: list[str] = field(default_factory=list)  # its --peers, fixed at creation
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--join"]
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    wanted: bool = False  # the harness started it and has not stopped or killed it
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    host: str = HOST  # SMTP and admin (a NetLab node: its client link)
    raft_host: str = HOST  # Raft (a NetLab node: its Raft link)
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NS

    @property
    def raft_addr(self) -> str:
        return f"{self.raft_host}:{self.raft_port}"

    @property
    def smtp_addr(self) -> str:
        return f"{self.host}:{self.smtp_port}"

    @property
    def admin_addr(self) -> str:
        return f"{self.host}:{self.admin_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_addr}"

    @property
    def running(self) -> bool:
        """Process exists and has not exited (it may be paused)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def live(self) -> bool:
        """Running and not paused: expected to answer."""
        return self.running and not self.paused

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """N `mqnode run` processes; see the module docstring for its promises."""

    def __init__(
        self,
        base_dir: Path,
        n: int = 3,
        extra_args: Sequence[str] = FAST_TUNING,
        relay_host: str | None = None,
        dns_server: str | None = None,
        start_timeout_s: float = 30.0,
        netlab: NetLab | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.relay_host = relay_host
        self.dns_server = dns_server
        self.start_timeout_s = start_timeout_s
        self.secret_file = self.base_dir / "cluster.secret"
        self.secret_file.write_text(SECRET + "\n", encoding="utf-8")
        os.chmod(self.secret_file, 0o600)
        self.admin_token_file = self.base_dir / "admin.token"
        self.admin_token_file.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
        os.chmod(self.admin_token_file, 0o600)
        self.nodes: list[NodeProc] = []
        self.netlab = netlab
        ports = free_ports(3 * n)
        for i in range(n):
            node = self._make_node(ports[3 * i : 3 * i + 3])
            if netlab is not None:  # its own namespace: see netlab.py
                node.host, node.raft_host = netlab.client_ip(i), netlab.raft_ip(i)
                node.prefix = netlab.exec_prefix(i)
        for node in self.nodes:
            node.peers = [p.raft_addr for p in self.nodes if p is not node]

    def _make_node(self, ports: Sequence[int]) -> NodeProc:
        i = len(self.nodes)
        raft_port, smtp_port, admin_port = ports
        node = NodeProc(
            index=i,
            node_id=f"n{i + 1}",
            raft_port=raft_port,
            smtp_port=smtp_port,
            admin_port=admin_port,
            data_dir=self.base_dir / f"n{i + 1}" / "data",
            log_path=self.base_dir / f"n{i + 1}" / "node.log",
        )
        self.nodes.append(node)
        return node

    def add_node(self, peers: Sequence[int] | None = None, join: bool = True) -> int:
        """Make (not start) one more node whose --peers name `peers` (default: the nodes the
        harness keeps up), with `--join` unless join=False. Returns its index."""
        members = self.up_indexes() if peers is None else list(peers)
        used = {p for n in self.nodes for p in (n.raft_port, n.smtp_port, n.admin_port)}
        ports = free_ports(3)
        while used & set(ports):
            ports = free_ports(3)
        node = self._make_node(ports)
        if self.netlab is not None:
            if node.index >= self.netlab.n:
                raise ClusterError(f"the NetLab has {self.netlab.n} hosts; node {node.index}?")
            node.host, node.raft_host = (
                self.netlab.client_ip(node.index),
                self.netlab.raft_ip(node.index),
            )
            node.prefix = self.netlab.exec_prefix(node.index)
        node.peers = [self.nodes[i].raft_addr for i in members]
        node.extra_args = ["--join"] if join else []
        return node.index

    # --- context manager ---------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- process control ---------------------------------------------------

    def command(self, i: int) -> list[str]:
        node = self.nodes[i]
        peers = ",".join(node.peers)
        cmd = [
            *node.prefix,
            sys.executable,
            "-m",
            "mqnode.cli",
            "run",
            "--node-id",
            node.node_id,
            "--data-dir",
            str(node.data_dir),
            "--raft-addr",
            node.raft_addr,
            "--peers",
            peers,
            "--smtp-addr",
            node.smtp_addr,
            "--admin-addr",
            node.admin_addr,
            "--cluster-secret-file",
            str(self.secret_file),
            "--admin-token-file",
            str(self.admin_token_file),
        ]
        if self.relay_host:
            cmd += ["--relay-host", self.relay_host]
        if self.dns_server:
            cmd += ["--dns-server", self.dns_server]
        if not self.relay_host and not self.dns_server:
            # Nowhere on loopback to deliver to: never dispatch (no system DNS, no port 25).
            cmd += ["--no-delivery-enabled"]
        if self.netlab is not None:
            # Clients come from the root side of the client links, not from loopback.
            nets = f"127.0.0.0/8,{self.netlab.client_net()}"
            cmd += ["--allowed-networks", nets, "--client-limit-exceptions", nets]
        return cmd + node.extra_args + self.extra_args

    def start(self, wait_leader: bool = True) -> None:
        """Start every node that is not running; wait for admin endpoints (and a leader)."""
        for node in self.nodes:
            if not node.running:
                self.spawn(node.index)
        self.wait_admin_up(range(len(self.nodes)), self.start_timeout_s)
        if wait_leader:
            self.wait_for_leader(self.start_timeout_s)

    def spawn(self, i: int) -> None:
        """Start node i's process (no waiting)."""
        node = self.nodes[i]
        if node.running:
            pid = node.proc.pid if node.proc else None
            raise ClusterError(f"{node.node_id} is already running (pid {pid})")
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.starts += 1
        with open(node.log_path, "ab") as log:
            log.write(f"=== harness: start #{node.starts} of {node.node_id} ===\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                self.command(i),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not nodes
            )
        node.paused = False
        node.wanted = True

    def start_node(self, i: int, timeout_s: float | None = None) -> None:
        """Start node i again (after kill/stop) and wait until its admin endpoint answers."""
        self.spawn(i)
        self.wait_admin_up([i], timeout_s or self.start_timeout_s)

    def _reap(self, node: NodeProc, timeout_s: float) -> bool:
        assert node.proc is not None
        try:
            rc = node.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        node.exit_codes.append(rc)
        return True

    def _signal(self, node: NodeProc, sig: signal.Signals) -> None:
        assert node.proc is not None
        with suppress(ProcessLookupError):
            os.kill(node.proc.pid, sig)

    def stop_node(self, i: int, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM node i (SIGKILL after grace_s); return its exit code (None if not running)."""
        node = self.nodes[i]
        node.wanted = False
        if node.proc is None or node.proc.returncode is not None:
            return None
        if node.paused:
            self._signal(node, signal.SIGCONT)
            node.paused = False
        self._signal(node, signal.SIGTERM)
        if not self._reap(node, grace_s):
            self._signal(node, signal.SIGKILL)
            self._reap(node, grace_s)
        return node.proc.returncode

    def kill(self, i: int) -> None:
        """SIGKILL node i (kill -9) and reap it."""
        node = self.nodes[i]
        if not node.running:
            raise ClusterError(f"kill({i}): {node.node_id} is not running")
        assert node.proc is not None
        node.wanted = False
        self._signal(node, signal.SIGKILL)
        self._reap(node, STOP_GRACE_S)
        node.paused = False

    def pause(self, i: int) -> None:
        """SIGSTOP node i: it keeps its sockets but answers nothing."""
        node = self.nodes[i]
        if not node.running:
            raise ClusterError(f"pause({i}): {node.node_id} is not running")
        self._signal(node, signal.SIGSTOP)
        node.paused = True

    def resume(self, i: int) -> None:
        """SIGCONT node i."""
        node = self.nodes[i]
        if not node.running:
            raise ClusterError(f"resume({i}): {node.node_id} is not running")
        self._signal(node, signal.SIGCONT)
        node.paused = False

    def restart(self, i: int, hard: bool = False) -> None:
        """Stop node i (SIGTERM, or SIGKILL if hard) and start it again at the same addresses."""
        if hard:
            self.kill(i)
        else:
            self.stop_node(i)
        self.start_node(i)

    def stop(self) -> None:
        """Stop every node. Never raises for a node that is already gone."""
        running = [n for n in self.nodes if n.running]
        for node in self.nodes:
            node.wanted = False
        for node in running:  # signal all first so they shut down in parallel
            if node.paused:
                self._signal(node, signal.SIGCONT)
                node.paused = False
            self._signal(node, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for node in running:
            if not self._reap(node, max(0.1, deadline - time.monotonic())):
                self._signal(node, signal.SIGKILL)
                self._reap(node, STOP_GRACE_S)

    # --- observation -------------------------------------------------------

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for node in self.nodes:
            state = "paused" if node.paused else ("running" if node.running else "down")
            rc = node.proc.returncode if node.proc is not None else None
            parts.append(
                f"--- {node.node_id} ({state}, exit {rc}, {node.log_path}) last {lines} lines ---\n"
                f"{node.log_tail(lines)}"
            )
        return "\n".join(parts)

    def fail(self, what: str) -> ClusterError:
        return ClusterError(f"{what}\n{self.logs()}")

    def _check_alive(self, indexes: Sequence[int]) -> None:
        for i in indexes:
            node = self.nodes[i]
            if node.wanted and node.proc is not None and node.proc.poll() is not None:
                raise self.fail(
                    f"{node.node_id} exited unexpectedly with code {node.proc.returncode}"
                )

    def live_indexes(self) -> list[int]:
        """Nodes the harness keeps up and has not paused."""
        return [n.index for n in self.nodes if n.wanted and n.live]

    def up_indexes(self) -> list[int]:
        """Nodes the harness keeps up (paused or not)."""
        return [n.index for n in self.nodes if n.wanted]

    def get(self, i: int, path: str, timeout_s: float = 3.0) -> Any:
        """GET admin `path` on node i as JSON; ClusterError (with logs) on any failure."""
        url = self.nodes[i].admin_url + path
        try:
            return http_get_json(url, timeout_s)
        except urllib.error.HTTPError as exc:
            raise self.fail(f"GET {url}: HTTP {exc.code}") from exc
        except (OSError, ValueError) as exc:
            raise self.fail(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def try_get(self, i: int, path: str, timeout_s: float = 2.0) -> Any | None:
        try:
            return http_get_json(self.nodes[i].admin_url + path, timeout_s)
        except (OSError, ValueError):
            return None

    def status(self, i: int) -> dict[str, Any]:
        status: dict[str, Any] = self.get(i, "/status")
        return status

    def queue_messages(self, i: int, state: str | None = None) -> list[dict[str, Any]]:
        """Every queued message on node i (all states unless `state` is given)."""
        query = "limit=100000" + (f"&state={state}" if state else "")
        doc = self.get(i, f"/queue?{query}", timeout_s=10.0)
        messages: list[dict[str, Any]] = doc["messages"]
        return messages

    def queue_body(self, i: int, queue_id: str, timeout_s: float = 30.0) -> bytes:
        """The stored message bytes of `queue_id` on node i (GET /queue/<id>/body)."""
        return http_get(f"{self.nodes[i].admin_url}/queue/{queue_id}/body", timeout_s)

    def queue_ids(self, i: int) -> list[str]:
        return sorted(m["id"] for m in self.queue_messages(i))

    def queue_entry(self, i: int, queue_id: str) -> dict[str, Any] | None:
        """One message from node i's admin API, or None if it answers 404."""
        url = f"{self.nodes[i].admin_url}/queue/{queue_id}"
        try:
            entry: dict[str, Any] = http_get_json(url)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise self.fail(f"GET {url}: HTTP {exc.code}") from exc
        except (OSError, ValueError) as exc:
            raise self.fail(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        return entry

    # --- bounded waits -----------------------------------------------------

    def poll(
        self,
        what: str,
        probe: Callable[[], tuple[T | None, str]],
        timeout_s: float,
        watch: Sequence[int] | None = None,
    ) -> T:
        """Call probe() until it returns a value; it returns (value|None, what it saw)."""
        deadline = time.monotonic() + timeout_s
        seen = "nothing yet"
        while True:
            self._check_alive(self.up_indexes() if watch is None else watch)
            value, seen = probe()
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise self.fail(f"timed out after {timeout_s:.0f}s waiting for {what}; saw {seen}")
            time.sleep(POLL_S)

    def wait_admin_up(self, indexes: Sequence[int] | range, timeout_s: float) -> None:
        idx = list(indexes)

        def probe() -> tuple[bool | None, str]:
            down = [self.nodes[i].node_id for i in idx if self.try_get(i, "/status") is None]
            return (True if not down else None), f"no admin answer from {down}"

        names = [self.nodes[i].node_id for i in idx]
        self.poll(f"admin endpoints of {names}", probe, timeout_s, idx)

    def wait_smtp_workers_up(self, timeout_s: float) -> None:
        """Until every live node's SMTP workers all accept connections (/status
        `smtp_workers.up`; nodes without workers count as up)."""

        def probe() -> tuple[bool | None, str]:
            starting = {}
            for i, s in self._statuses().items():
                workers = (s or {}).get("smtp_workers", {"up": 0, "configured": 1})
                if workers is None:
                    continue
                # A release that does not count its workers up (bench baselines) is up.
                up = workers.get("up", workers["configured"])
                if up < workers["configured"]:
                    starting[self.nodes[i].node_id] = f"{up} of {workers['configured']}"
            return (True if not starting else None), f"workers accepting: {starting}"

        self.poll("every node's SMTP workers to accept", probe, timeout_s)

    def _statuses(self, among: Sequence[int] | None = None) -> dict[int, dict[str, Any] | None]:
        idx = self.live_indexes() if among is None else [i for i in among if self.nodes[i].live]
        return {i: self.try_get(i, "/status") for i in idx}

    def wait_for_leader(self, timeout_s: float = 20.0, among: Sequence[int] | None = None) -> int:
        """Index of a leader that has quorum and that every live node names as its leader.

        `among`: only these nodes count (e.g. leave out a node that is not a member yet).
        """

        def probe() -> tuple[int | None, str]:
            statuses = self._statuses(among)
            summary = {
                self.nodes[i].node_id: (
                    (s.get("role"), s.get("leader_id"), s.get("term")) if s else "no answer"
                )
                for i, s in statuses.items()
            }
            leaders = [i for i, s in statuses.items() if s and s.get("role") == "leader"]
            if len(leaders) != 1 or any(s is None for s in statuses.values()):
                return None, f"(role, leader_id, term): {summary}"
            lead = leaders[0]
            lead_status = statuses[lead]
            assert lead_status is not None
            if not lead_status.get("has_quorum", True):
                return None, f"leader {self.nodes[lead].node_id} lacks quorum: {summary}"
            for s in statuses.values():
                assert s is not None
                if not self._names_leader(s, lead):
                    return None, f"not all live nodes name the leader yet: {summary}"
            return lead, ""

        return self.poll("a leader every live node agrees on", probe, timeout_s)

    def _names_leader(self, status: dict[str, Any], lead: int) -> bool:
        node = self.nodes[lead]
        return status.get("leader_id") == node.node_id or (
            not status.get("leader_id") and status.get("leader_raft_addr") == node.raft_addr
        )

    def leader(self) -> int:
        """Index of the current leader (waits a short, bounded time for one)."""
        return self.wait_for_leader(self.start_timeout_s)

    def followers(self) -> list[int]:
        lead = self.leader()
        return [i for i in self.live_indexes() if i != lead]

    def wait_applied_equal(self, timeout_s: float = 20.0) -> int:
        """Wait until all live nodes report one last_applied and hold the same queue ids.

        Returns that last_applied index.
        """

        def probe() -> tuple[int | None, str]:
            idx = self.live_indexes()
            applied: dict[str, Any] = {}
            for i in idx:
                s = self.try_get(i, "/status")
                applied[self.nodes[i].node_id] = s.get("last_applied") if s else None
            values = set(applied.values())
            if None in values or len(values) != 1:
                return None, f"last_applied: {applied}"
            ids = {self.nodes[i].node_id: self.queue_ids(i) for i in idx}
            distinct = {tuple(v) for v in ids.values()}
            if len(distinct) != 1:
                counts = {k: len(v) for k, v in ids.items()}
                return None, f"last_applied equal ({applied}) but queue ids differ: {counts}"
            value = values.pop()
            assert isinstance(value, int)
            return value, ""

        return self.poll("all live nodes to apply the same log and queue", probe, timeout_s)


@contextmanager
def running_cluster(base_dir: Path, n: int = 3, **kwargs: Any) -> Iterator[Cluster]:
    """`with running_cluster(tmp_path) as c:` — started, with a leader; always stopped."""
    with Cluster(base_dir, n, **kwargs) as cluster:
        yield cluster
