"""How the suite is split over pytest-xdist workers (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import work_unit

ROOT = Path(__file__).resolve().parents[2]
FILES = (
    "tests/unit/test_handover.py",
    "tests/unit/test_dot_stuff.py",
    "tests/unit/test_eventloop.py",
)


def test_a_file_is_one_unit_and_all_fault_tests_are_one() -> None:
    assert work_unit("tests/integration/test_delivery.py::TestDelivery::test_a") == (
        "tests/integration/test_delivery.py"
    )
    assert work_unit("tests/integration/test_delivery.py::test_b[x-y]") == (
        "tests/integration/test_delivery.py"
    )
    assert work_unit("tests/fault/test_faults.py::test_c") == "tests/fault"
    assert work_unit("tests/fault/test_net_faults.py::test_d[3.0]") == "tests/fault"


def test_two_workers_keep_each_file_on_one() -> None:
    """A real `pytest -n 2 --dist loadgroup` run: the scheduler is the one in use (xdist's
    own marks grouped nothing, silently)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    args = ["-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v", *FILES]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, path in re.findall(r"^\[(gw\d+)\].* PASSED (\S+?)::", proc.stdout, re.M):
        workers[path].add(worker)
    assert set(workers) == set(FILES), proc.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
