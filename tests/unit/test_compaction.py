"""compaction_min_entries: the snapshot threshold follows the state size, within bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqnode.raft.compaction import SAMPLE_ENTRIES, SCALE_FROM_BYTES, compaction_min_entries

MIB = 1024 * 1024
LOG_MAP = 1024 * MIB


def test_small_state_keeps_the_configured_count() -> None:
    assert compaction_min_entries(2000, 5000, 300 * MIB, SCALE_FROM_BYTES - 1, LOG_MAP) == 2000


def test_too_few_entries_to_judge() -> None:
    assert compaction_min_entries(2000, SAMPLE_ENTRIES - 1, MIB, 500 * MIB, LOG_MAP) is None


def test_large_state_lets_the_log_hold_half_its_bytes() -> None:
    # 64 KiB entries, 600 MiB of state: 300 MiB of log = 4800 entries, under the map's third
    assert compaction_min_entries(2000, 1024, 64 * MIB, 600 * MIB, LOG_MAP) == 4800


def test_a_log_already_past_its_share_compacts_now() -> None:
    assert compaction_min_entries(2000, 5000, 400 * MIB, 4000 * MIB, LOG_MAP) == 2000


def test_never_beyond_a_third_of_the_log_map() -> None:
    got = compaction_min_entries(2000, 1024, 64 * MIB, 4000 * MIB, LOG_MAP)
    assert got == int(LOG_MAP / 3 / (64 * 1024))


@given(
    configured=st.integers(1, 100_000),
    entries=st.integers(SAMPLE_ENTRIES, 10**6),
    log_bytes=st.integers(1, 2 * LOG_MAP),
    state_bytes=st.integers(0, 16 * 1024 * MIB),
)
def test_bounds(configured: int, entries: int, log_bytes: int, state_bytes: int) -> None:
    got = compaction_min_entries(configured, entries, log_bytes, state_bytes, LOG_MAP)
    assert got is not None and got >= configured
    if got > configured:  # scaled: the log it allows stays within a third of the map
        assert got * (log_bytes / entries) <= LOG_MAP / 3 + log_bytes / entries
