"""formats: keep fields out of the log until every member can read them.

A member decodes entries up to its `READS_LEVEL` (spool/commands.py). Each node
announces its own under every leader it sees (node.py), and the replicated
state keeps the announced levels by Raft address (the `nodes` meta). The
cluster's level is the lowest among the current Raft members; a member that
never announced one counts as 1 (the first release, whose Announce had no
level).

`LevelGate` wraps the commit pipeline for SMTP ingress, in-process or for the
workers: below level 2 an Enqueue's DSN fields (RFC 3461) are dropped before
submit. The mail is queued; the client's RET/ENVID/NOTIFY/ORCPT are not kept
(a warning says so, once per minute at most). A first-release member would
skip an entry carrying them (it skips any entry it cannot decode), and its
queue would diverge from its peers'. So during a rolling upgrade from the
first release, DSN parameters take effect once the last member runs this one.
An Enqueue whose body is deflated (level 7) is inflated back before submit
below that level.

The same level sets how big a log entry may be (`commands.entry_sizes`):
`LevelGate.entry_sizes()` is what intake (intake.py) splits bodies by and the
commit pipeline packs entries to, here and, pushed with the store's fill
ratio, in the SMTP workers.

Why here and not by leaving DSN out of EHLO: SMTP workers do not read the
state, and the members can change between a client's EHLO and its DATA; the
node that submits is the one place that sees both.

Limits: the level is read at most once per `LEVEL_CACHE_S`; a member added
with an older release inside that second could still meet one such entry.
Add members running the same release as the cluster (docs/maintenance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from mqnode.clock import Clock
from mqnode.compression import inflate
from mqnode.errors import CorruptDataError, SubmitError
from mqnode.raft.commit_pipeline import Submitter
from mqnode.spool.commands import (
    DEFLATE,
    DEFLATED_BODY_LEVEL,
    READS_LEVEL,
    Command,
    Enqueue,
    EntrySizes,
    encode_command,
    entry_sizes,
)
from mqnode.spool.statemachine import Result

log = logging.getLogger(__name__)

DSN_LEVEL = 2  # Enqueue's dsn_* fields
LEVEL_CACHE_S = 1.0
WARN_EVERY_S = 60.0


def cluster_level(nodes: Mapping[str, Any], members: Iterable[str]) -> int:
    """The lowest level the `members` announced (1 for one that never did)."""
    levels = [int(nodes.get(m, {}).get("reads", 1)) for m in members]
    return min(levels, default=READS_LEVEL)


def announced_level(nodes: Mapping[str, Any], members: Iterable[str]) -> int:
    """The lowest level among the `members` that announced one.

    For Announce's member list, not for DSN fields: a member that never announced is
    left out, because the member whose list is wrong may be one that never reached
    the others (a typo in `peers` names a node nobody runs), and counting it as level
    1 would keep every list out of the log exactly when one is needed. Every member
    of an earlier release that ever had a leader has announced its level.
    """
    return cluster_level(nodes, [m for m in members if m in nodes])


def announce_again(
    nodes: Mapping[str, Any], seen: Mapping[str, int], own_addr: str, mine: Mapping[str, Any]
) -> tuple[bool, dict[str, int]]:
    """Whether a node announces itself again (Node._keep_announced), and the levels now.

    Again when the state's entry for it differs from `mine`, or when another member's
    level rose since `seen` (a member that skipped its Announce while on the first
    release has been upgraded: it needs the Announce once more).
    """
    levels = {a: int(info.get("reads", 1)) for a, info in nodes.items()}
    entry = nodes.get(own_addr, {})
    stale = any(entry.get(k) != v for k, v in mine.items())
    upgraded = any(v > seen.get(a, 1) for a, v in levels.items() if a != own_addr)
    return stale or upgraded, levels


class LevelGate:
    """A Submitter that drops what the cluster's level cannot carry yet (module doc)."""

    def __init__(self, submitter: Submitter, level: Callable[[], int], clock: Clock) -> None:
        self._submitter = submitter
        self._read_level = level
        self._clock = clock
        self._level = 0
        self._read_at = float("-inf")
        self._warned_at = float("-inf")

    def level(self, fresh: bool = False) -> int:
        """The cluster's level, read again when `fresh` or older than `LEVEL_CACHE_S`."""
        now = self._clock.monotonic_s()
        if fresh or now - self._read_at >= LEVEL_CACHE_S:
            self._level, self._read_at = self._read_level(), now
        return self._level

    def entry_sizes(self) -> EntrySizes:
        return entry_sizes(self.level())

    def _below(self, level: int) -> bool:
        """Whether the cluster reads below `level`, read again before acting on a yes: the
        pipeline reads the level for every entry it packs, so the cached one may be from
        before the last member announced."""
        return self.level() < level and self.level(fresh=True) < level

    async def submit(self, cmd: Command) -> Result:
        # A worker deflates by the level its node last pushed; a member of an older
        # release may have joined since (a rare path: the body is inflated again here,
        # and refused with a 451 if it is then too big for one entry at this level: the
        # client's retry is split into chunks by the level the worker is told next).
        if isinstance(cmd, Enqueue) and cmd.body_encoding and self._below(DEFLATED_BODY_LEVEL):
            cmd = _inflated(cmd, self.entry_sizes().max_entry)
        if isinstance(cmd, Enqueue) and _has_dsn(cmd) and self._below(DSN_LEVEL):
            now = self._clock.monotonic_s()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "%s: DSN parameters not kept: a member runs a release that cannot read "
                    "them (cluster reads level %d); they apply once every member is upgraded",
                    cmd.queue_id,
                    self._level,
                )
            cmd = replace(cmd, dsn_ret="", dsn_envid="", dsn_notify=(), dsn_orcpt=())
        return await self._submitter.submit(cmd)


def _inflated(cmd: Enqueue, max_entry: int) -> Enqueue:
    """`cmd` with its deflated body as it is; SubmitError if it does not inflate, or if it
    no longer fits an entry of `max_entry` bytes."""
    if cmd.body is None or cmd.body_encoding != DEFLATE:
        raise SubmitError(f"{cmd.queue_id}: body encoding {cmd.body_encoding[:20]!r} unknown")
    if cmd.body_size > max_entry:  # would not fit: not inflated at all
        raise SubmitError(f"{cmd.queue_id}: {cmd.body_size} bytes do not fit one entry; try again")
    try:
        body = inflate(cmd.body, cmd.body_size, f"{cmd.queue_id}: deflated body")
    except CorruptDataError as exc:
        raise SubmitError(str(exc)) from exc
    plain = replace(cmd, body=body, body_encoding="")
    size = sum(map(len, encode_command(plain)))
    if size > max_entry:
        raise SubmitError(f"{cmd.queue_id}: {size} bytes do not fit one entry; try again")
    return plain


def _has_dsn(cmd: Enqueue) -> bool:
    return bool(cmd.dsn_ret or cmd.dsn_envid or cmd.dsn_notify or cmd.dsn_orcpt)
