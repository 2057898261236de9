"""Fixtures for real-process tests: clusters that are always stopped, and a CLI runner.

`shared_cluster` (one per module) is for tests that do not kill or pause
nodes; they must only look at their own messages. `cluster` is a fresh
3-node cluster per test, for tests that break things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import FAST_TUNING, SECRET, Cluster, free_ports

MAX_MESSAGE_BYTES = 5 * 1024 * 1024 + 64 * 1024  # fits the 5 MiB test body, not much more
MAX_RECIPIENTS = 5
SHARED_TUNING: tuple[str, ...] = (
    *FAST_TUNING,
    "--max-message-bytes",
    str(MAX_MESSAGE_BYTES),
    "--max-recipients",
    str(MAX_RECIPIENTS),
)
CLI_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("shared"), n=3, extra_args=SHARED_TUNING) as c:
        yield c


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", n=3, extra_args=FAST_TUNING) as c:
        yield c


RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli() -> RunCli:
    """Run `python -m mqnode.cli ARGS...`; a process still running after the timeout is
    killed (by PID) and the test fails, so a node that starts when it should not cannot
    hang the suite."""

    def run(*args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mqnode.cli", *args]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(
                f"{' '.join(args)} still running after {timeout_s:.0f}s; stderr tail:\n"
                + "\n".join(err.splitlines()[-15:])
            )
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run


@pytest.fixture
def node_args(tmp_path: Path) -> dict[str, str]:
    """Valid `mqnode run` flags for one node on free ports (flag name without -- -> value)."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    raft, peer1, peer2, smtp, admin = free_ports(5)
    return {
        "node-id": "n1",
        "data-dir": str(tmp_path / "data"),
        "raft-addr": f"127.0.0.1:{raft}",
        "peers": f"127.0.0.1:{peer1},127.0.0.1:{peer2}",
        "smtp-addr": f"127.0.0.1:{smtp}",
        "admin-addr": f"127.0.0.1:{admin}",
        "cluster-secret-file": str(secret),
    }

