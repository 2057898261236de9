"""AutoSuppress: a hard bounce puts its address on the suppression list.

Mailing an address that said "no such user" again harms the sender's
reputation with every large mailbox provider. When a recipient bounces with
a category that means the address will not work (by default
invalid-recipient, bad-domain and inactive-mailbox: `suppress_bounces`,
each with its own expiry in days), the lease holder adds an entry for that
address, for every sender, source "bounce", with the category and the reply
as its reason. Senders whose domain is in `suppress_bounce_exempt_domains`
add nothing (a mailbox provider's own notifications, say).

Best effort: the outcome is recorded first; an entry that cannot be
committed now (no leader, a member on a release without the suppression
list) is logged and skipped: the next bounce of that address adds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mqnode.errors import ConfigError, MqnodeError
from mqnode.events import EventLog
from mqnode.raft.commit_pipeline import Replicator
from mqnode.spool.commands import Suppress
from mqnode.spool.model import QueuedMessage
from mqnode.spool.suppression import ENTRIES_PER_COMMAND, SuppressionError, make_entry

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
MAX_DAYS = 36_500


def parse_rules(items: list[str], known: set[str]) -> dict[str, int]:
    """`suppress_bounces` entries ("CATEGORY:DAYS", 0 days: never expires) as
    {category: days}; ConfigError naming the entry."""
    out: dict[str, int] = {}
    for item in items:
        category, _, days = item.partition(":")
        category = category.strip()
        if category not in known:
            raise ConfigError(f"suppress_bounces: {item!r}: {category!r} is not a bounce category")
        try:
            n = int(days) if days.strip() else 30
        except ValueError:
            raise ConfigError(f"suppress_bounces: {item!r}: days must be a number") from None
        if not 0 <= n <= MAX_DAYS:
            raise ConfigError(f"suppress_bounces: {item!r}: days from 0 to {MAX_DAYS}")
        out[category] = n
    return out


@dataclass
class AutoSuppress:
    replicator: Replicator
    days_by_category: dict[str, int]
    exempt_domains: frozenset[str]
    writable: Callable[[], bool]  # whether every member reads Suppress (formats)
    added = 0

    async def after_bounces(
        self,
        msg: QueuedMessage,
        bounced: list[tuple[str, str, str]],
        now_ms: int,
        events: EventLog | None,
    ) -> None:
        """Entries for the `bounced` (recipient, category, reply) that call for one."""
        sender_domain = msg.mail_from.rpartition("@")[2].lower()
        if not self.days_by_category or sender_domain in self.exempt_domains:
            return
        entries = []
        for rcpt, category, reply in bounced:
            days = self.days_by_category.get(category)
            if days is None:
                continue
            try:
                entry = make_entry(
                    rcpt,
                    reason=f"{category}: {reply}",
                    source="bounce",
                    created_ms=now_ms,
                    expires_ms=now_ms + days * DAY_MS if days else 0,
                )
            except SuppressionError:
                continue  # not an address we could look up again either
            entries.append(entry)
        if not entries:
            return
        if not self.writable():
            log.warning(
                "%s: %d bounced address(es) not suppressed: a member runs a release "
                "without the suppression list",
                msg.queue_id,
                len(entries),
            )
            return
        for start in range(0, len(entries), ENTRIES_PER_COMMAND):
            part = entries[start : start + ENTRIES_PER_COMMAND]
            cmd = Suppress("add", tuple(e.as_command_item() for e in part), now_ms)
            try:
                status, detail = await self.replicator.submit(cmd)
            except MqnodeError as exc:
                log.warning("%s: bounced addresses not suppressed: %s", msg.queue_id, exc)
                return
            if status != "ok":
                log.warning("%s: bounced addresses not suppressed: %s", msg.queue_id, detail)
                return
            self.added += len(part)
            for e in part:
                log.info("%s: suppressed <%s>: %s", msg.queue_id, e.target, e.reason)
                if events is not None:
                    events.emit("suppression-added", msg.queue_id, to=e.target, reason=e.reason)
