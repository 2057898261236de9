"""allocator.keep_big_buffers: big buffers freed and allocated again are not faulted in anew."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHURN = """
import resource, sys
from mqnode.allocator import keep_big_buffers
if sys.argv[1] == "kept":
    assert keep_big_buffers()
data = bytes(4 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # a message's worth of copies, made and dropped
    copy = bytearray(data)
    joined = b"".join([bytes(copy), b"x"])
    del copy, joined
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_buffers_are_reused_instead_of_faulted_in_again() -> None:
    # 50 rounds of two 4 MiB buffers: ~100,000 page faults when each is a new mapping
    default, kept = _faults("default"), _faults("kept")
    assert default > 20_000, default
    assert kept < default // 10, (kept, default)
