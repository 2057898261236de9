"""compaction_min_entries: how long the Raft log may grow before a snapshot, by state size.

A snapshot copies the whole queue state (snapshot_writer.py), and pysyncobj
takes one every `log_compaction_min_entries` entries (or `..._min_time_s`).
With a deep queue (a destination down for hours, large messages) a fixed
count means copying hundreds of MB for every few MB appended. Past
`SCALE_FROM_BYTES` of state, the log may instead hold about half the
state's bytes before compacting, so a snapshot's copy is paid for by at
least as many appended bytes (the LSM habit of a size ratio). Bounds: never
fewer entries than configured, never more than `LOG_MAP_SHARE` of the Raft
log's map (a full log map refuses appends; a log already that big gets the
configured count back, so it compacts at once), and only once the log holds
`SAMPLE_ENTRIES` entries to estimate their average size.

Trade-off: a follower that restarts replays a longer log (still bounded as
above), and a snapshot sent to a lagging follower is no bigger than before.
"""

from __future__ import annotations

SCALE_FROM_BYTES = 64 * 1024 * 1024
LOG_MAP_SHARE = 1 / 3
SAMPLE_ENTRIES = 10


def compaction_min_entries(
    configured: int, log_entries: int, log_bytes: int, state_bytes: int, log_map_bytes: int
) -> int | None:
    """Entries before the next snapshot; None: too few entries to judge, keep the last answer."""
    if state_bytes < SCALE_FROM_BYTES:
        return configured
    if log_entries < SAMPLE_ENTRIES or log_bytes <= 0:
        return None
    if log_bytes >= log_map_bytes * LOG_MAP_SHARE:
        return configured  # whatever the estimate said: compact now
    per_entry = log_bytes / log_entries
    wanted = int(state_bytes / 2 / per_entry)
    ceiling = int(log_map_bytes * LOG_MAP_SHARE / per_entry)
    return max(configured, min(wanted, ceiling))
