"""compaction_min_entries: how long the Raft log may grow before a snapshot, by state size.

A snapshot copies the whole queue state (snapshot_writer.py), and pysyncobj
takes one every `log_compaction_min_entries` entries (or `..._min_time_s`).
With a deep queue (a destination down for hours, large messages) a fixed
count means copying hundreds of MB for every few MB appended. Past
`SCALE_FROM_BYTES` of state, the log may instead hold one to two times the
state's bytes before compacting (the configured count times a power of two,
so the period stays put while the state grows), so a snapshot's copy is paid
for by at least as many appended bytes (the LSM habit of a size ratio). With half
to all, 500-800 MB of queued 100 KiB mail was copied by each member every few
hundred MB appended, and 160 msg/s saw p99 DATA-to-250 of 40-680 ms; with one to
two times, 31-33 ms. Bounds: never more than `LOG_MAP_SHARE` of the Raft log's
map, at any state size (a full log map refuses appends, and 2,000 entries of
1 MiB are half the default map; a log already that big gets its own length
back, so it compacts at once), else
never fewer entries than configured, but for a small state's big entries
(below); scaled only once the log holds `SAMPLE_ENTRIES` entries to estimate
their average size.

Below `SCALE_FROM_BYTES` of state the log holds the configured count of
entries, but no more than `SMALL_STATE_LOG_BYTES` of them. Otherwise 2,000
entries of mail with 1 MiB attachments would be 2 GB of log (1.3 GB, the
map's third, by default) for a queue that delivers as fast as it accepts and
holds a few MiB: a log its node reads and checks whole when it starts, written
into file pages new to it until its first snapshot (LMDB reuses a compacted
log's pages). Held to 64 MiB, each member copies its small state at most once
per 64 MiB appended, as in the scaled case. Measured (1 MiB attachments into
a fresh cluster, bench paired-large's generator): 40 messages a second
accepted with the log held so, each node's log file ~100 MB; 33 with 1.3 GB
logs.

Trade-off: the log takes up to twice the state's disk (bounded as above), and a
node reads and checks all of it when it starts; memory does not grow with it
(journal.py keeps only the newest commands in memory). A snapshot sent to a
lagging follower is no bigger than before.

`staggered_threshold` spreads the members' snapshots over the period. Their
logs are the same, so with one threshold every member copied its state at the
same index: on a shared disk and two cores the three copies stalled acceptance
for ~100 ms (bench latency row, p99.9); on separate machines both followers'
disks were busy at once, and a commit needs one of them.
"""

from __future__ import annotations

SCALE_FROM_BYTES = 64 * 1024 * 1024
SMALL_STATE_LOG_BYTES = SCALE_FROM_BYTES
LOG_MAP_SHARE = 1 / 3
SAMPLE_ENTRIES = 10


def compaction_min_entries(
    configured: int, log_entries: int, log_bytes: int, state_bytes: int, log_map_bytes: int
) -> int | None:
    """Entries before the next snapshot; None: too few entries to judge, keep the last answer."""
    if log_entries < SAMPLE_ENTRIES or log_bytes <= 0:
        return configured if state_bytes < SCALE_FROM_BYTES else None
    per_entry = log_bytes / log_entries
    # Entries of up to 1 MiB (spool/commands.py): the configured count alone could be
    # more than the map holds, whatever the state's size.
    ceiling = max(SAMPLE_ENTRIES, int(log_map_bytes * LOG_MAP_SHARE / per_entry))
    if log_bytes >= log_map_bytes * LOG_MAP_SHARE:
        return min(configured, log_entries)  # whatever the estimate said: compact now
    if state_bytes < SCALE_FROM_BYTES:
        # A small state: the configured count, held to SMALL_STATE_LOG_BYTES of big entries.
        held = max(SAMPLE_ENTRIES, int(SMALL_STATE_LOG_BYTES / per_entry))
        return min(configured, ceiling, held)
    wanted = int(state_bytes / per_entry)
    # Powers of two of the configured count: the period stays put while the state
    # grows, and all members (whose estimates differ a little) agree on it, which
    # keeps their snapshots staggered (staggered_threshold).
    steps = configured
    while steps < wanted:
        steps *= 2
    return min(steps, ceiling)


def staggered_threshold(every: int, first_index: int, rank: int, members: int) -> int:
    """Log length at which to snapshot, so that member `rank` of `members` snapshots
    at log indexes `rank / members` of a period after member 0.

    The next snapshot index is the first one in this member's phase at least half a
    period past the log's start, so the log holds between half and one and a half
    periods of entries (one on average).
    """
    every = max(every, 1)
    phase = every * rank // max(members, 1)
    lowest = first_index + every // 2
    return lowest + (phase - lowest) % every - first_index
