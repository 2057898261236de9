"""Suite-wide: how pytest-xdist splits the suite (`scripts/test -n 2 --dist loadgroup`).

A test file stays on one worker (classes share a cluster, and some files' tests build on
each other's mail); the fault tests (tests/fault) all run one after another on one
worker, so two clusters under fault load never share the machine. Each worker takes its
own share of the loopback ports (localports.take_share), so two never pick the same free
port.

The split is our scheduler's, from the test ids alone. xdist's own `xdist_group` marks
do not group anything under pytest 9: xdist puts the group into the test id through an
attribute that pytest no longer reads.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from mqnode.devtools import localports


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if worker.startswith("gw"):
        localports.take_share(int(worker[2:]), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))


def work_unit(nodeid: str) -> str:
    """What runs on one worker, in collection order: the fault tests, or one file."""
    path = nodeid.split("::", 1)[0]
    return "tests/fault" if path.startswith("tests/fault/") else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)
