"""Fixtures for real-process tests: clusters that are always stopped, and a CLI runner.

`shared_cluster` (one per module) is for tests that do not kill or pause
nodes; they must only look at their own messages. It runs with small limits
(`LIMITS_TUNING`). `cluster` is a fresh 3-node cluster per test, for tests
that break things.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import RunCli
from tests.support.cli import run_cli as _run_cli
from tests.support.cluster import FAST_TUNING, LIMITS_TUNING, SECRET, Cluster, free_ports


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("shared"), n=3, extra_args=LIMITS_TUNING) as c:
        yield c


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", n=3, extra_args=FAST_TUNING) as c:
        yield c


@pytest.fixture
def run_cli() -> RunCli:
    return _run_cli


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
