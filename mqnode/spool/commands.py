"""The replicated command schema and its msgpack codec.

One Raft log entry carries a *batch* of commands (group commit: many SMTP
sessions share one entry, one append and one LMDB transaction). Wire format:

    entry := FORMAT_VERSION (1 byte) || msgpack([[tag, field, ...], ...])

Everything a command needs to be applied deterministically (ids, timestamps,
random choices) is made before submit and carried here. A node must never
guess at an entry written by a newer version: a newer format byte, an unknown
tag or more fields than this version knows raise `NewerFormatError`, which
stops the node's applying (see spool/statemachine.py) instead of letting it skip
what its peers apply; other malformed input raises `CodecError` and is
rejected the same way everywhere.

Fields added to a command after its first release have defaults and come
last; the encoder leaves out a trailing run of them that all hold their
defaults, so an entry that uses no new feature is byte for byte what the
previous version wrote (an Enqueue without DSN parameters has 13 fields).

Limits: an entry stays under its `EntrySizes.max_entry`, so bodies above
`inline_max` travel as `PutChunk` commands of `chunk` bytes. Which sizes
apply is the cluster's reads level (`entry_sizes`): `BIG_ENTRIES` (1 MiB)
once every member reads `BIG_ENTRIES_LEVEL`, else `SMALL_ENTRIES` (56 KiB),
the sizes a member of an earlier release can send on. pysyncobj sends an
entry of its append batch size or more in pieces whose last-piece test
compares against the wrong length; earlier releases keep the 64 KiB batch,
this one a batch of `raft/settings.py` APPEND_BATCH_BYTES, above any entry.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import msgpack

from mqnode.errors import CodecError, NewerFormatError
from mqnode.storage import array_header, pack_pieces

FORMAT_VERSION = 1
# What this build decodes, as a level its Announce carries (raft/formats.py keeps fields a
# member cannot read out of the log): 1, the first release; 2, Enqueue's DSN fields and
# Announce's `reads`, and an entry from a newer version stops the node instead of being
# skipped; 3, Announce's `members`; 4, Suppress and SetShaping; 5, Audit; 6, entries of
# up to 1 MiB (a member of this level sends them whole: module docstring); 7, Enqueue's
# `body_encoding` (a body deflated where it was accepted: compression.py).
READS_LEVEL = 7
MEMBERS_LEVEL = 3  # the level from which an Announce may carry `members`
SUPPRESS_LEVEL = 4  # the level from which the suppression list may be written
AUDIT_LEVEL = 5  # the level from which the audit trail may be written
BIG_ENTRIES_LEVEL = 6  # the level from which entries may carry up to 1 MiB
DEFLATED_BODY_LEVEL = 7  # the level from which an Enqueue's body may travel deflated
DEFLATE = "deflate"  # Enqueue.body_encoding: `body` is a zlib stream of `body_size` bytes
BODY_ENCODINGS = ("", DEFLATE)


@dataclass(frozen=True)
class EntrySizes:
    """How big a log entry and the body parts in it may be (module docstring), and
    whether an inline body may travel deflated."""

    max_entry: int  # an entry's commands are packed while they stay under this
    chunk: int  # a staged body's PutChunk data
    inline_max: int  # a body (with its envelope) up to this travels inside its Enqueue
    deflate_bodies: bool = False  # Enqueue.body_encoding DEFLATE may be used


SMALL_ENTRIES = EntrySizes(max_entry=56 * 1024, chunk=48 * 1024, inline_max=32 * 1024)
# A 1 MiB body is one inline Enqueue, not 22 chunks: each entry costs every node a
# journal write, an LMDB commit's pages and a replication round of its own.
BIG_ENTRIES = EntrySizes(max_entry=1024 * 1024, chunk=960 * 1024, inline_max=960 * 1024)


BIG_DEFLATED_ENTRIES = replace(BIG_ENTRIES, deflate_bodies=True)


def entry_sizes(level: int) -> EntrySizes:
    """The sizes a cluster whose members read at least `level` can carry."""
    if level >= DEFLATED_BODY_LEVEL:
        return BIG_DEFLATED_ENTRIES
    return BIG_ENTRIES if level >= BIG_ENTRIES_LEVEL else SMALL_ENTRIES


@dataclass(frozen=True)
class Enqueue:
    """Queue one message. Body inline (`body`) or staged by `PutChunk` under `upload_id`."""

    TAG: ClassVar[int] = 1
    queue_id: str
    received_ms: int
    mail_from: str
    recipients: tuple[str, ...]
    body: bytes | None
    upload_id: str
    chunks: int
    body_size: int
    body_sha256: bytes
    idem_key: bytes
    message_id: str
    client: str
    node_id: str
    # RFC 3461 (spool/dsnparams.py); optional, added after the first release.
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_notify: tuple[str, ...] = ()  # per recipient, or () when none gave NOTIFY
    dsn_orcpt: tuple[str, ...] = ()  # per recipient, or () when none gave ORCPT
    # How `body` is carried (level 7): "" as it is, DEFLATE as a zlib stream of `body_size`
    # bytes (compression.py); the state keeps it so. Staged bodies are never deflated.
    body_encoding: str = ""


@dataclass(frozen=True)
class PutChunk:
    """One piece of a large body, staged until the `Enqueue` that names its upload."""

    TAG: ClassVar[int] = 2
    upload_id: str
    seq: int
    data: bytes
    created_ms: int


@dataclass(frozen=True)
class Announce:
    """A node tells the cluster who it is (maps Raft address to node id) and what it reads."""

    TAG: ClassVar[int] = 3
    raft_addr: str
    node_id: str
    smtp_addr: str
    admin_addr: str
    term: int
    reads: int = 1  # the highest READS_LEVEL it decodes; optional, added after the first release
    # The member list this node works with (level 3; empty below it): `cluster status` and
    # the leader compare every member's with the leader's, so a typo in one node's --peers
    # shows instead of silently giving it wrong majorities.
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordOutcome:
    """Result of one delivery attempt: per-recipient (index, outcome, reply).

    Fenced: rejected when `epoch` is older than the current lease epoch. A bounce
    (`dsn_body`, from the null sender to the original sender) is queued in the same
    apply, so a recorded bounce and its notification cannot be separated by a crash.
    """

    TAG: ClassVar[int] = 4
    queue_id: str
    at_ms: int
    results: tuple[tuple[int, str, str], ...]
    next_attempt_ms: int
    epoch: int
    dsn_queue_id: str
    dsn_body: bytes


@dataclass(frozen=True)
class LeaseRenew:
    """The leader extends its dispatch lease; `epoch` is its Raft term."""

    TAG: ClassVar[int] = 5
    node_id: str
    raft_addr: str
    epoch: int
    duration_ms: int


@dataclass(frozen=True)
class Claim:
    """The lease holder claims messages before connecting for them."""

    TAG: ClassVar[int] = 6
    queue_ids: tuple[str, ...]
    node_id: str
    epoch: int


@dataclass(frozen=True)
class QueueOp:
    """Operator action on messages (postsuper-like): hold, release, delete, retry."""

    TAG: ClassVar[int] = 7
    op: str
    queue_ids: tuple[str, ...]
    at_ms: int


QUEUE_OPS = ("hold", "release", "delete", "retry")  # "bounce" is a RecordOutcome, see control


@dataclass(frozen=True)
class Suppress:
    """Add entries to the suppression list, or remove them (spool/suppression.py).

    An entry: (target, scope, reason, source, created_ms, expires_ms). The target is an
    address ("bob@example.org") or a whole domain ("@example.org"), normalised before
    submit; the scope is "" (every sender) or one sending domain; expires_ms 0: never.
    Removing reads the target and scope only.
    """

    TAG: ClassVar[int] = 8
    op: str  # "add" | "remove"
    entries: tuple[tuple[str, str, str, str, int, int], ...]
    at_ms: int


SUPPRESS_OPS = ("add", "remove")


@dataclass(frozen=True)
class SetShaping:
    """The traffic shaping rules every lease holder enforces (delivery/shaping.py): the
    TOML text as the operator applied it, checked again when applied."""

    TAG: ClassVar[int] = 9
    text: str
    at_ms: int


@dataclass(frozen=True)
class Audit:
    """One administrative write, recorded before it is carried out (admin/audit.py): who
    (`principal`), what (`action`, e.g. "queue/delete"), on what (`target`), when, through
    which node. Records older than `keep_ms` before `at_ms` are dropped as it applies."""

    TAG: ClassVar[int] = 10
    at_ms: int
    principal: str
    action: str
    target: str
    node_id: str
    keep_ms: int


Command = (
    Enqueue
    | PutChunk
    | Announce
    | RecordOutcome
    | LeaseRenew
    | Claim
    | QueueOp
    | Suppress
    | SetShaping
    | Audit
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_suppression(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 6
        and all(isinstance(x, str) for x in v[:4])
        and _is_int(v[4])
        and _is_int(v[5])
    )


def _is_result(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 3
        and _is_int(v[0])
        and isinstance(v[1], str)
        and isinstance(v[2], str)
    )


# Field annotation (as written above) -> wire-shape check. Decoding checks every field,
# so apply() never meets a wrong type, whatever a peer or an older version wrote.
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "bytes": lambda v: isinstance(v, bytes),
    "bytes | None": lambda v: v is None or isinstance(v, bytes),
    "tuple[str, ...]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "tuple[tuple[int, str, str], ...]": lambda v: isinstance(v, list) and all(map(_is_result, v)),
    "tuple[tuple[str, str, str, str, int, int], ...]": lambda v: (
        isinstance(v, list) and all(map(_is_suppression, v))
    ),
}
# The exact types msgpack gives for a field that passes its check; a container field
# (None here) is checked by its function. `_from_list` checks a command's types at once
# against the combinations seen to pass (`_Schema.passing`), the rest field by field.
_EXACT: dict[str, frozenset[type] | None] = {
    "str": frozenset({str}),
    "int": frozenset({int}),
    "bytes": frozenset({bytes}),
    "bytes | None": frozenset({bytes, type(None)}),
    "tuple[str, ...]": None,
    "tuple[tuple[int, str, str], ...]": None,
    "tuple[tuple[str, str, str, str, int, int], ...]": None,
}
_BY_TAG: dict[int, type[Any]] = {
    c.TAG: c
    for c in (
        Enqueue,
        PutChunk,
        Announce,
        RecordOutcome,
        LeaseRenew,
        Claim,
        QueueOp,
        Suppress,
        SetShaping,
        Audit,
    )
}
_TUPLE_FIELDS = {"recipients", "results", "queue_ids", "dsn_notify", "dsn_orcpt", "members"}
_NESTED_TUPLE_FIELDS = {"results", "entries"}
_MAX_TAG = max(_BY_TAG)


def _results_tuple(value: list[list[Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(r) for r in value)


# Submitted by SMTP ingress, which never reads the state after the answer: answered
# once committed, before the state's fsync (RaftNode.submit_entry's `early`).
ANSWERED_ON_COMMIT = (Enqueue, PutChunk)
# Never batched with other commands: a member that cannot decode it (it carries fields a
# release may not know before the cluster's reads level is known) skips it alone.
ENTRY_OF_ITS_OWN = (Announce,)


@dataclass(frozen=True)
class _Schema:
    """A command class's fields read once (`dataclasses.fields` per command: 4% of a leader)."""

    cls: type[Any]
    values: Callable[[Any], tuple[Any, ...]]  # the field values in order
    fields: tuple[tuple[str, Callable[[Any], bool], Callable[[Any], Any] | None], ...]
    required: int  # the fields without a default: the first release's
    defaults: tuple[Any, ...]  # of the optional fields after them, as encoded
    exact: tuple[frozenset[type] | None, ...]  # per field: `_EXACT`
    containers: tuple[tuple[int, Callable[[Any], bool]], ...]  # (index, check) of the rest
    converts: tuple[tuple[int, Callable[[Any], Any]], ...]  # (index, convert)
    # The field types (`type` of each value) that passed, so that a command of such
    # types needs only its containers checked. Bounded: each field has one or two exact
    # types, and most commands have no optional ones.
    passing: set[tuple[type, ...]] = field(default_factory=set)

    def types_pass(self, types: tuple[type, ...]) -> bool:
        """Whether values of exactly these types pass their fields' checks (containers
        apart). The answer for a combination never changes, so a passing one is kept."""
        if types in self.passing:
            return True
        ok = all(
            allowed is None or t in allowed for t, allowed in zip(types, self.exact, strict=False)
        )
        if ok:
            self.passing.add(types)
        return ok


def _schema(cls: type[Any]) -> _Schema:
    spec = []
    defaults: list[Any] = []
    for f in fields(cls):
        convert = (
            _results_tuple
            if f.name in _NESTED_TUPLE_FIELDS
            else tuple
            if f.name in _TUPLE_FIELDS
            else None
        )
        spec.append((f.name, _CHECKS[str(f.type)], convert))
        if f.default is not MISSING:
            defaults.append(f.default)
        elif defaults:
            raise TypeError(f"{cls.__name__}.{f.name}: a field after an optional one needs one")
    getter = operator.attrgetter(*(name for name, _, _ in spec))
    values = getter if len(spec) > 1 else (lambda cmd: (getter(cmd),))
    exact = tuple(_EXACT[str(f.type)] for f in fields(cls))
    return _Schema(
        cls,
        values,
        tuple(spec),
        len(spec) - len(defaults),
        tuple(defaults),
        exact,
        tuple((i, check) for i, (_, check, _) in enumerate(spec) if exact[i] is None),
        tuple((i, conv) for i, (_, _, conv) in enumerate(spec) if conv is not None),
    )


_SCHEMAS: dict[int, _Schema] = {tag: _schema(cls) for tag, cls in _BY_TAG.items()}


def _to_list(cmd: Command) -> list[Any]:
    schema = _SCHEMAS[cmd.TAG]
    values = schema.values(cmd)
    if not schema.defaults:
        return [cmd.TAG, *values]
    end = len(values)
    while end > schema.required and values[end - 1] == schema.defaults[end - 1 - schema.required]:
        end -= 1
    return [cmd.TAG, *values[:end]]


def _from_list(item: Any) -> Command:
    if not isinstance(item, list) or not item:
        raise CodecError(f"command is not a non-empty list: {type(item).__name__}")
    tag = item[0]
    schema = _SCHEMAS.get(tag) if _is_int(tag) else None
    if schema is None:
        if _is_int(tag) and tag > _MAX_TAG:
            raise NewerFormatError(f"command tag {tag} is newer than this version's {_MAX_TAG}")
        raise CodecError(f"unknown command tag {tag!r}")
    spec = schema.fields
    name = schema.cls.__name__
    if len(item) - 1 > len(spec):
        raise NewerFormatError(f"{name} has {len(item) - 1} fields; this version knows {len(spec)}")
    if len(item) - 1 < schema.required:
        raise CodecError(f"{name}: expected {schema.required} fields, got {len(item) - 1}")
    values = item[1:]
    if schema.types_pass(tuple(map(type, values))) and all(
        check(values[i]) for i, check in schema.containers if i < len(values)
    ):
        for i, to_tuple in schema.converts:
            if i < len(values):
                values[i] = to_tuple(values[i])
        fast: Command = schema.cls(*values)
        return fast
    values = []  # field by field, to say which one is wrong
    for (field_name, check, convert), value in zip(spec, item[1:], strict=False):
        if not check(value):
            raise CodecError(f"{name}.{field_name}: wrong type {type(value).__name__}")
        values.append(value if convert is None else convert(value))
    cmd: Command = schema.cls(*values)
    return cmd


def to_wire(cmd: Command) -> list[Any]:
    """One command as the list an entry holds (SMTP workers send commands to their node so)."""
    return _to_list(cmd)


def from_wire(item: Any) -> Command:
    """`to_wire`'s inverse, checked field by field like an entry's (CodecError)."""
    try:
        return _from_list(item)
    except TypeError as exc:
        raise CodecError(f"bad command fields: {exc}") from exc


_VERSION_BYTE = bytes([FORMAT_VERSION])


def encode_entry(commands: list[Command]) -> bytes:
    return encode_packed_entry([encode_command(c) for c in commands])


def encode_command(cmd: Command) -> list[bytes]:
    """One command as an entry holds it, in pieces that `encode_packed_entry` joins.

    A body chunk (a bytes field of 64 KiB or more) is a piece of its own
    (`storage.pack_pieces`): the entry's join is then its only copy on the leader.
    """
    return pack_pieces(_to_list(cmd))


def encode_packed_entry(packed: list[list[bytes]]) -> bytes:
    """`encode_entry` of commands already encoded by `encode_command` (no second encoding)."""
    if not packed:
        raise CodecError("an entry needs at least one command")
    header = array_header(len(packed))
    return b"".join([_VERSION_BYTE, header, *(piece for pieces in packed for piece in pieces)])


def decode_entry(data: bytes) -> list[Command]:
    if not data:
        raise CodecError("empty entry")
    if data[0] > FORMAT_VERSION:
        raise NewerFormatError(f"entry format {data[0]}; this version reads {FORMAT_VERSION}")
    if data[0] != FORMAT_VERSION:
        raise CodecError(f"entry format version {data[0]} is not {FORMAT_VERSION}")
    try:
        # A view: an entry may hold a body chunk of a MiB, and a slice would copy it.
        items = msgpack.unpackb(memoryview(data)[1:], raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"undecodable entry: {exc}") from exc
    if not isinstance(items, list):
        raise CodecError("entry payload is not a list")
    try:
        return [_from_list(i) for i in items]
    except TypeError as exc:
        raise CodecError(f"bad command fields: {exc}") from exc
