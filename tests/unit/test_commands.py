"""The replicated command codec: round-trips, version check, and CodecError for anything bad.

A follower must never apply an entry it cannot decode exactly, and decoding
must never fail with anything but `CodecError` (the state machine turns that
into a deterministic rejection; any other exception would wedge the tick).
"""

from __future__ import annotations

from dataclasses import MISSING, fields, replace
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqnode.errors import CodecError, NewerFormatError
from mqnode.spool.commands import (
    FORMAT_VERSION,
    Announce,
    Audit,
    Claim,
    Command,
    Enqueue,
    LeaseRenew,
    PutChunk,
    QueueOp,
    RecordOutcome,
    decode_entry,
    encode_command,
    encode_entry,
    encode_packed_entry,
)
from mqnode.storage import pack_pieces

from .kit import enqueue

# msgpack carries integers in [-2**63, 2**64 - 1].
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
small_text = st.text(max_size=40)
blobs = st.binary(max_size=200)

enqueues = st.builds(
    Enqueue,
    queue_id=small_text,
    received_ms=ints,
    mail_from=small_text,
    recipients=st.lists(small_text, max_size=5).map(tuple),
    body=st.none() | blobs,
    upload_id=small_text,
    chunks=ints,
    body_size=ints,
    body_sha256=blobs,
    idem_key=blobs,
    message_id=small_text,
    client=small_text,
    node_id=small_text,
)
put_chunks = st.builds(PutChunk, upload_id=small_text, seq=ints, data=blobs, created_ms=ints)
announces = st.builds(
    Announce,
    raft_addr=small_text,
    node_id=small_text,
    smtp_addr=small_text,
    admin_addr=small_text,
    term=ints,
)
record_outcomes = st.builds(
    RecordOutcome,
    queue_id=small_text,
    at_ms=ints,
    results=st.lists(st.tuples(ints, small_text, small_text), max_size=5).map(tuple),
    next_attempt_ms=ints,
    epoch=ints,
    dsn_queue_id=small_text,
    dsn_body=st.binary(max_size=64),
)
lease_renews = st.builds(
    LeaseRenew, node_id=small_text, raft_addr=small_text, epoch=ints, duration_ms=ints
)
claims = st.builds(
    Claim,
    queue_ids=st.lists(small_text, max_size=5).map(tuple),
    node_id=small_text,
    epoch=ints,
)
queue_ops = st.builds(
    QueueOp,
    op=st.sampled_from(["hold", "release", "delete", "retry"]),
    queue_ids=st.lists(small_text, max_size=5).map(tuple),
    at_ms=ints,
)
audits = st.builds(
    Audit,
    at_ms=ints,
    principal=small_text,
    action=small_text,
    target=small_text,
    node_id=small_text,
    keep_ms=ints,
)
commands: st.SearchStrategy[Command] = st.one_of(
    enqueues, put_chunks, announces, record_outcomes, lease_renews, claims, queue_ops, audits
)
batches = st.lists(commands, min_size=1, max_size=20)

# Arbitrary msgpack-able values, biased towards lists that start with a valid tag.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False)
    | small_text
    | blobs
    | st.sampled_from([1, 2, 3, 4]),
    lambda children: (
        st.lists(children, max_size=15) | st.dictionaries(small_text | blobs, children, max_size=4)
    ),
    max_leaves=40,
)


def _valid_entry() -> bytes:
    return encode_entry(
        [
            enqueue("Q1", idem=b"k1"),
            PutChunk("Q2", 0, b"data", 5),
            Announce("127.0.0.1:7001", "n1", "127.0.0.1:2525", "127.0.0.1:8025", 3),
            RecordOutcome("Q1", 10, ((0, "delivered", "250 ok"),), 20, 1, "", b""),
            LeaseRenew("n1", "127.0.0.1:7001", 3, 3000),
            Claim(("Q1", "Q2"), "n1", 3),
        ]
    )


def _decodes_or_codec_error(data: bytes) -> None:
    try:
        cmds = decode_entry(data)
    except CodecError:
        return
    assert isinstance(cmds, list)
    kinds = Enqueue | PutChunk | Announce | RecordOutcome | LeaseRenew | Claim | QueueOp | Audit
    assert all(isinstance(c, kinds) for c in cmds)


# -- round trips -------------------------------------------------------------------------


@given(batches)
def test_round_trip_of_mixed_batches(cmds: list[Command]) -> None:
    data = encode_entry(cmds)
    assert data[0] == FORMAT_VERSION
    assert decode_entry(data) == cmds


@given(commands)
def test_decoded_sequences_are_tuples(cmd: Command) -> None:
    # Dataclass equality would not notice a list where a tuple belongs, but hashing would.
    (back,) = decode_entry(encode_entry([cmd]))
    if isinstance(back, Enqueue):
        assert type(back.recipients) is tuple
    if isinstance(back, RecordOutcome):
        assert type(back.results) is tuple
        assert all(type(r) is tuple for r in back.results)


@given(batches)
def test_encode_command_sizes_bound_the_entry(cmds: list[Command]) -> None:
    # The commit pipeline packs entries by summing encode_command sizes plus 16 bytes.
    assert len(encode_entry(cmds)) <= sum(len(b"".join(encode_command(c))) for c in cmds) + 16


@given(st.lists(commands, min_size=1, max_size=70))
def test_an_entry_of_packed_commands_is_the_same_entry(cmds: list[Command]) -> None:
    # The commit pipeline encodes each command once and joins them (up to 16 and past:
    # msgpack's array header grows at 16 items).
    assert encode_packed_entry([encode_command(c) for c in cmds]) == encode_entry(cmds)


big_blobs = st.sampled_from([0, 1, 0x100, 0xFFFF, 0x10000, 0x10001, 1 << 20]).map(
    lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256)
)


@given(
    st.one_of(
        st.builds(PutChunk, upload_id=small_text, seq=ints, data=big_blobs, created_ms=ints),
        enqueues,
        st.builds(lambda c, b: replace(c, body=b), enqueues, big_blobs),
        st.builds(lambda c, b: replace(c, dsn_body=b), record_outcomes, big_blobs),
    )
)
def test_a_command_in_pieces_is_msgpack_of_its_fields(cmd: Command) -> None:
    # Body chunks are pieces of their own (no copy by packb); joined, the pieces are
    # exactly what msgpack makes of the command's list, and the entry decodes back.
    pieces = encode_command(cmd)
    fields_list = msgpack.unpackb(b"".join(pieces), raw=False)
    assert b"".join(pieces) == msgpack.packb(fields_list, use_bin_type=True)
    assert decode_entry(encode_packed_entry([pieces, pieces])) == [cmd, cmd]


def test_a_body_chunk_is_its_own_piece_not_a_copy() -> None:
    data = b"y" * (1 << 20)
    pieces = encode_command(PutChunk("up", 3, data, 7))
    assert any(p is data for p in pieces)
    assert len(encode_command(PutChunk("up", 3, b"y" * 1000, 7))) == 1


def test_encode_of_no_commands_raises() -> None:
    with pytest.raises(CodecError):
        encode_entry([])
    with pytest.raises(CodecError):
        encode_packed_entry([])


# -- the version byte ---------------------------------------------------------------------


@given(st.integers(0, 255).filter(lambda b: b != FORMAT_VERSION))
def test_other_version_byte_raises(version: int) -> None:
    data = bytes([version]) + _valid_entry()[1:]
    with pytest.raises(CodecError, match="version"):
        decode_entry(data)


def test_empty_entry_raises() -> None:
    with pytest.raises(CodecError):
        decode_entry(b"")


# -- malformed payloads --------------------------------------------------------------------


def _entry_of(payload: Any) -> bytes:
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes([FORMAT_VERSION]) + packed


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"a": 1}, id="map"),
        pytest.param(5, id="int"),
        pytest.param("text", id="str"),
        pytest.param(b"bytes", id="bin"),
        pytest.param(None, id="nil"),
    ],
)
def test_non_list_payload_raises(payload: Any) -> None:
    with pytest.raises(CodecError, match="not a list"):
        decode_entry(_entry_of(payload))


@pytest.mark.parametrize("tag", [0, -1, "1", None, b"\x01", True])
def test_unknown_tag_raises(tag: Any) -> None:
    with pytest.raises(CodecError, match="unknown command tag") as info:
        decode_entry(_entry_of([[tag, "x", 1]]))
    assert not isinstance(info.value, NewerFormatError)


@pytest.mark.parametrize("tag", [11, 99])
def test_a_tag_past_the_last_known_is_a_newer_format(tag: int) -> None:
    """A newer mqnode's command: the node must stop, not skip it (statemachine.apply)."""
    with pytest.raises(NewerFormatError, match="newer"):
        decode_entry(_entry_of([[tag, "x", 1]]))


def test_a_newer_entry_format_byte_stops_and_an_unknown_older_one_is_rejected() -> None:
    packed = encode_entry([enqueue("Q1")])[1:]
    with pytest.raises(NewerFormatError):
        decode_entry(bytes([FORMAT_VERSION + 1]) + packed)
    with pytest.raises(CodecError) as info:
        decode_entry(bytes([0]) + packed)
    assert not isinstance(info.value, NewerFormatError)


def test_an_enqueue_without_dsn_parameters_is_encoded_as_the_first_release_did() -> None:
    """13 fields: a node of the previous release reads it (optional fields left out)."""
    plain = enqueue("Q1")
    items = msgpack.unpackb(encode_entry([plain])[1:], raw=False)
    assert len(items[0]) == 1 + 13
    assert decode_entry(encode_entry([plain])) == [plain]


def test_dsn_fields_travel_and_only_as_far_as_the_last_one_set() -> None:
    with_ret = replace(enqueue("Q1"), dsn_ret="HDRS")
    items = msgpack.unpackb(encode_entry([with_ret])[1:], raw=False)
    assert len(items[0]) == 1 + 14
    full = replace(
        enqueue("Q2", rcpts=("a@x.org", "b@y.org")),
        dsn_envid="env 1",
        dsn_notify=("SUCCESS,FAILURE", ""),
        dsn_orcpt=("", "rfc822;b@old.example"),
    )
    assert decode_entry(encode_entry([with_ret, full])) == [with_ret, full]


@pytest.mark.parametrize(
    "item",
    [
        pytest.param([], id="empty-command"),
        pytest.param(5, id="int-command"),
        pytest.param({"1": 2}, id="map-command"),
        pytest.param([[1], "x"], id="unhashable-tag"),
    ],
)
def test_malformed_command_raises(item: Any) -> None:
    with pytest.raises(CodecError):
        decode_entry(_entry_of([item]))


@pytest.mark.parametrize("cls", [Enqueue, PutChunk, Announce, RecordOutcome, LeaseRenew, Claim])
@pytest.mark.parametrize("delta", [-1, +1])
def test_wrong_field_count_raises(cls: type[Any], delta: int) -> None:
    examples: dict[type[Any], Command] = {
        Enqueue: enqueue("Q1"),
        PutChunk: PutChunk("Q1", 0, b"d", 1),
        Announce: Announce("a:1", "n", "s:2", "d:3", 1),
        RecordOutcome: RecordOutcome("Q1", 1, ((0, "delivered", "ok"),), 2, 1, "", b""),
        LeaseRenew: LeaseRenew("n1", "a:1", 1, 3000),
        Claim: Claim(("Q1",), "n1", 1),
    }
    good = examples[cls]
    items = msgpack.unpackb(encode_entry([good])[1:], raw=False)
    cmd = items[0]
    if delta < 0:
        with pytest.raises(CodecError, match="expected"):
            decode_entry(_entry_of([cmd[: 1 + len(_required(cls)) - 1]]))
        return
    known = len(fields(cls))
    with pytest.raises(NewerFormatError, match="this version knows"):
        decode_entry(_entry_of([[*cmd, *(["extra"] * (1 + known - len(cmd) + 1))]]))


def _required(cls: type[Any]) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING]


@pytest.mark.parametrize("results", [5, [5], [[0, "delivered"], 7]])
def test_malformed_results_raise(results: Any) -> None:
    with pytest.raises(CodecError):
        decode_entry(_entry_of([[RecordOutcome.TAG, "Q1", 1, results, 2]]))


@given(batches, st.data())
def test_every_truncation_raises(cmds: list[Command], data: st.DataObject) -> None:
    full = encode_entry(cmds)
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    with pytest.raises(CodecError):
        decode_entry(full[:cut])


def test_trailing_garbage_raises() -> None:
    with pytest.raises(CodecError):
        decode_entry(_valid_entry() + b"\x00")


def test_deeply_nested_payload_raises() -> None:
    data = bytes([FORMAT_VERSION]) + b"\x91" * 100_000 + b"\x01"
    with pytest.raises(CodecError):
        decode_entry(data)


# -- fuzzing: CodecError and nothing else -----------------------------------------------


@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decodes_or_codec_error(data)


@given(st.binary(max_size=300))
def test_fuzz_random_bytes_behind_the_version(data: bytes) -> None:
    _decodes_or_codec_error(bytes([FORMAT_VERSION]) + data)


@given(msgpack_values)
def test_fuzz_arbitrary_msgpack(value: Any) -> None:
    _decodes_or_codec_error(_entry_of(value))


_FIELD_COUNTS = {c.TAG: len(fields(c)) for c in (Enqueue, PutChunk, Announce, RecordOutcome)}
_leaves = st.none() | st.booleans() | ints | small_text | blobs | st.lists(ints, max_size=3)


@given(st.data())
def test_fuzz_tagged_commands_with_right_and_wrong_arity(data: st.DataObject) -> None:
    items = []
    for _ in range(data.draw(st.integers(1, 3), label="commands")):
        tag = data.draw(st.sampled_from(sorted(_FIELD_COUNTS)), label="tag")
        n = _FIELD_COUNTS[tag] + data.draw(st.sampled_from([0, 0, 0, -1, 1]), label="skew")
        items.append([tag, *data.draw(st.lists(_leaves, min_size=n, max_size=n))])
    _decodes_or_codec_error(_entry_of(items))


@given(batches, st.data())
def test_fuzz_byte_flips_of_valid_entries(cmds: list[Command], data: st.DataObject) -> None:
    raw = bytearray(encode_entry(cmds))
    flips = data.draw(st.lists(st.tuples(st.integers(1, len(raw) - 1), st.integers(1, 255))))
    for pos, mask in flips:
        raw[pos] ^= mask
    _decodes_or_codec_error(bytes(raw))


@given(
    st.recursive(
        st.none() | st.integers(0, 2**32) | small_text | blobs | big_blobs,
        lambda inner: st.lists(inner, max_size=4),
        max_leaves=12,
    )
)
def test_pack_pieces_is_pack_at_any_depth(obj: Any) -> None:
    # What the SMTP workers' link sends too: [kind, request id, [tag, ...fields]].
    assert b"".join(pack_pieces(obj)) == msgpack.packb(obj, use_bin_type=True)


_EXAMPLES: list[Command] = [
    enqueue("Q1"),
    replace(enqueue("Q2", body=None), upload_id="Q2", chunks=2, dsn_notify=("SUCCESS",)),
    PutChunk("Q1", 0, b"d", 1),
    Announce("a:1", "n", "s:2", "d:3", 1),
    RecordOutcome("Q1", 1, ((0, "delivered", "ok"),), 2, 1, "", b""),
    LeaseRenew("n1", "a:1", 1, 3000),
    Claim(("Q1", "Q2"), "n1", 1),
]
# A value of each shape msgpack can give: for every field, all but the right ones.
_SHAPES: list[Any] = [True, 7, -1, "s", b"b", None, 1.5, [], ["s"], [[0, "a", "b"]], {"k": 1}]


def _accepts(annotation: str, value: Any) -> bool:
    """What a field of this annotation takes, written out for the test."""
    if annotation == "str":
        return type(value) is str
    if annotation == "int":
        return type(value) is int
    if annotation == "bytes":
        return type(value) is bytes
    if annotation == "bytes | None":
        return value is None or type(value) is bytes
    if annotation == "tuple[str, ...]":
        return type(value) is list and all(type(x) is str for x in value)
    if annotation == "tuple[tuple[int, str, str], ...]":
        return type(value) is list and all(
            type(r) is list and [type(x) for x in r] == [int, str, str] for r in value
        )
    raise AssertionError(annotation)


@pytest.mark.parametrize("good", _EXAMPLES, ids=lambda c: type(c).__name__)
def test_every_field_of_a_wrong_shape_is_refused_every_time(good: Command) -> None:
    # Decoding checks a command's field types at once against combinations seen to
    # pass before; a wrong shape in any field must still be refused, before and after
    # the right shapes have been seen.
    cmd = msgpack.unpackb(encode_entry([good])[1:], raw=False)[0]
    annotations = [str(f.type) for f in fields(type(good))]
    for _ in range(2):
        assert decode_entry(_entry_of([cmd])) == [good]
        for i in range(1, len(cmd)):
            for shape in _SHAPES:
                changed = [*cmd[:i], shape, *cmd[i + 1 :]]
                if _accepts(annotations[i - 1], shape):
                    decode_entry(_entry_of([changed]))
                else:
                    with pytest.raises(CodecError, match="wrong type"):
                        decode_entry(_entry_of([changed]))
