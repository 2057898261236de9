"""compaction_min_entries: the snapshot threshold follows the state size, within bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqnode.raft.compaction import (
    SAMPLE_ENTRIES,
    SCALE_FROM_BYTES,
    SMALL_STATE_LOG_BYTES,
    compaction_min_entries,
    staggered_threshold,
)

MIB = 1024 * 1024
LOG_MAP = 1024 * MIB


def test_small_state_keeps_the_configured_count() -> None:
    assert compaction_min_entries(2000, 5000, 30 * MIB, SCALE_FROM_BYTES - 1, LOG_MAP) == 2000


def test_too_few_entries_to_judge() -> None:
    assert compaction_min_entries(2000, SAMPLE_ENTRIES - 1, MIB, 500 * MIB, LOG_MAP) is None


def test_large_state_lets_the_log_hold_its_bytes_or_more() -> None:
    # 64 KiB entries, 150 MiB of state: 150 MiB of log = 2400 entries -> 2000 x 2
    assert compaction_min_entries(2000, 1024, 64 * MIB, 150 * MIB, LOG_MAP) == 4000


def test_the_period_stays_put_while_the_state_grows() -> None:
    # 2001 to 4000 entries wanted: one period, so the members' phases hold
    got = {
        compaction_min_entries(2000, 1024, 64 * MIB, state * MIB, LOG_MAP)
        for state in range(126, 250, 7)
    }
    assert got == {4000}


def test_a_log_already_past_its_share_compacts_now() -> None:
    assert compaction_min_entries(2000, 5000, 400 * MIB, 4000 * MIB, LOG_MAP) == 2000


def test_never_beyond_a_third_of_the_log_map() -> None:
    got = compaction_min_entries(2000, 1024, 64 * MIB, 4000 * MIB, LOG_MAP)
    assert got == int(LOG_MAP / 3 / (64 * 1024))


def test_big_entries_are_held_to_the_log_map_at_any_state_size() -> None:
    # 1 MiB entries (spool/commands.py BIG_ENTRIES): 2,000 of them would be twice the map
    got = compaction_min_entries(2000, 100, 100 * MIB, 200 * MIB, LOG_MAP)
    assert got == int(LOG_MAP / 3 / MIB)


def test_a_small_states_big_entries_are_held_to_its_log_bytes() -> None:
    # 1 MiB entries, a queue of 10 MiB: 64 entries, not 2,000 (or the map's third)
    got = compaction_min_entries(2000, 100, 100 * MIB, 10 * MIB, LOG_MAP)
    assert got == SMALL_STATE_LOG_BYTES // MIB
    # small entries: the configured count, which holds less than that
    assert compaction_min_entries(2000, 5000, 10 * MIB, 10 * MIB, LOG_MAP) == 2000
    # entries bigger than a tenth of it: still a sample's worth
    assert compaction_min_entries(2000, 10, 100 * MIB, MIB, 10 * LOG_MAP) == SAMPLE_ENTRIES


def test_a_log_of_big_entries_past_its_share_compacts_now() -> None:
    assert compaction_min_entries(2000, 400, 400 * MIB, 10 * MIB, LOG_MAP) == 400


@given(
    configured=st.integers(1, 100_000),
    entries=st.integers(SAMPLE_ENTRIES, 10**6),
    log_bytes=st.integers(1, 2 * LOG_MAP),
    state_bytes=st.integers(0, 16 * 1024 * MIB),
)
def test_bounds(configured: int, entries: int, log_bytes: int, state_bytes: int) -> None:
    got = compaction_min_entries(configured, entries, log_bytes, state_bytes, LOG_MAP)
    assert got is not None and got >= 1
    per_entry = log_bytes / entries
    if log_bytes >= LOG_MAP / 3:  # past its share: compacts at the log's length or before
        assert got <= entries
        return
    # the log it allows stays within a third of the map (or the sample it was judged by)
    assert got * per_entry <= LOG_MAP / 3 + per_entry or got == SAMPLE_ENTRIES
    small = state_bytes < SCALE_FROM_BYTES
    if small:  # and within SMALL_STATE_LOG_BYTES for a small state
        assert got * per_entry <= SMALL_STATE_LOG_BYTES + per_entry or got == SAMPLE_ENTRIES
    # never fewer than configured unless the map or a small state's bytes say so
    held = LOG_MAP / 3 if not small else min(LOG_MAP / 3, SMALL_STATE_LOG_BYTES)
    assert got >= configured or (got + 1) * per_entry > held


def _snapshot_indexes(every: int, rank: int, members: int, count: int) -> list[int]:
    first, out = 1, []
    for _ in range(count):
        first += staggered_threshold(every, first, rank, members)
        out.append(first)
    return out


def test_members_snapshot_a_third_of_a_period_apart() -> None:
    runs = [_snapshot_indexes(2000, rank, 3, 5) for rank in range(3)]
    assert runs[0] == [2000, 4000, 6000, 8000, 10000]
    assert runs[1] == [2666, 4666, 6666, 8666, 10666]
    assert runs[2] == [1333, 3333, 5333, 7333, 9333]


@given(
    every=st.integers(1, 100_000),
    first=st.integers(0, 10**9),
    members=st.integers(1, 9),
    data=st.data(),
)
def test_staggered_threshold_bounds(
    every: int, first: int, members: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, members - 1))
    got = staggered_threshold(every, first, rank, members)
    assert every // 2 <= got < every // 2 + every  # the log holds about one period
    assert (first + got) % every == every * rank // members  # in this member's phase
