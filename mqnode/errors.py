"""Exception tree.

MqnodeError
├── ConfigError            bad flags or config file: one line, exit code 2
├── CorruptDataError       a data file fails its checksum or format check
├── CodecError             a replicated command cannot be decoded (version, shape)
│   └── NewerFormatError   ... because a newer mqnode wrote it: this node must stop applying
├── MembershipError        a member add/remove was refused or not committed (`kind` says why)
└── SubmitError            a command was not committed; carries the SMTP reply to give
    ├── NoLeaderError      no leader known, or it changed under us (451)
    ├── CommitTimeoutError no commit within commit_timeout_ms (451): outcome unknown
    ├── BackpressureError  too many commits pending (451)
    └── StoreFullError     the LMDB map or disk is full (452)
"""

from __future__ import annotations

import asyncio
from typing import Any


class MqnodeError(Exception):
    """Base of every error mqnode raises on purpose."""


class ConfigError(MqnodeError):
    """Invalid configuration; the message names the offending key."""


class CorruptDataError(MqnodeError):
    """A data file on disk is damaged; never applied silently."""


class JournalDamagedError(CorruptDataError):
    """A Raft log entry read back while the node runs is damaged: the node stops (its
    next start refuses the log, naming the remedy) instead of retrying every tick."""


class CodecError(MqnodeError):
    """A replicated entry could not be decoded."""


class NewerFormatError(CodecError):
    """An entry uses a format, command or field this version does not know.

    Skipping it would let this node's queue diverge from its upgraded peers', so
    the node stops applying and exits instead; upgrading it lets it carry on.
    """


class MembershipError(MqnodeError):
    """A membership change was refused or did not commit.

    `kind`: "invalid" (malformed address), "not_leader" (`leader` names the leader's
    Raft address, if known), "refused" (the rules in raft/membership_rules.py), "timeout"
    (appended, not committed in time: it may still commit), "failed" (discarded).
    """

    def __init__(self, kind: str, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.leader = leader


class SubmitError(MqnodeError):
    """A submission did not commit. `smtp_code`/`smtp_status` say what to answer."""

    smtp_code = 451
    smtp_status = "4.3.0"

    def smtp_reply(self) -> str:
        return f"{self.smtp_code} {self.smtp_status} {self}"


class NoLeaderError(SubmitError):
    """No leader is known or the leader changed before commit."""


class CommitTimeoutError(SubmitError):
    """Commit did not complete in time; the entry may still commit later."""


class BackpressureError(SubmitError):
    """Too many commits in flight; the client should retry later."""


class MailLoopError(SubmitError):
    """The message has made `hopcount_limit` hops already: a mail loop (a refusal, final)."""

    smtp_code = 554
    smtp_status = "5.4.6"


class StoreFullError(SubmitError):
    """Storage is full; nothing new is accepted until space returns."""

    smtp_code = 452
    smtp_status = "4.3.1"


class StateMapFullError(StoreFullError):
    """The queue state's LMDB map filled while committing applied entries."""


def time_out(future: asyncio.Future[Any], what: str) -> None:
    """Fail `future` with CommitTimeoutError unless it was answered (a `call_later` target).

    Used instead of asyncio.wait_for, which wraps every request in a second future and
    callbacks. Whether the command committed is unknown, hence the advice to retry.
    """
    if not future.done():
        future.set_exception(
            CommitTimeoutError(f"{what}; outcome unknown: retry (a retry never queues twice)")
        )
