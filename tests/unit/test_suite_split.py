"""How the suite is split over pytest-xdist workers (tests/conftest.py)."""

from __future__ import annotations

from tests.conftest import work_unit


def test_a_file_is_one_unit_and_all_fault_tests_are_one() -> None:
    assert work_unit("tests/integration/test_delivery.py::TestDelivery::test_a") == (
        "tests/integration/test_delivery.py"
    )
    assert work_unit("tests/integration/test_delivery.py::test_b[x-y]") == (
        "tests/integration/test_delivery.py"
    )
    assert work_unit("tests/fault/test_faults.py::test_c") == "tests/fault"
    assert work_unit("tests/fault/test_net_faults.py::test_d[3.0]") == "tests/fault"
