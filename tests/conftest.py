"""Suite-wide: how pytest-xdist splits the suite (`scripts/test -n 2 --dist loadgroup`).

A test file stays on one worker (classes share a cluster, and some files' tests build on
each other's mail); the fault tests all run one after another on one worker, so two
clusters under fault load never share the machine. Each worker takes its own share of the
loopback ports (localports.take_share), so two never pick the same free port.
"""

from __future__ import annotations

import os

import pytest

from mqnode.devtools import localports


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if worker.startswith("gw"):
        localports.take_share(int(worker[2:]), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fault = item.get_closest_marker("fault") is not None
        group = "fault" if fault else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
