"""Records on disk are what every release wrote and reads: zlib's CRC-32 (computed by ISA-L),
the journal's framing.

Every journal entry, state record and snapshot file on disk carries a zlib.crc32 value;
a checksum that differed from it would call all of them "corrupt" after an upgrade.
"""

from __future__ import annotations

import zlib

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from mqnode.raft import logstore
from mqnode.storage import check_crc, crc32, with_crc


@given(st.binary(max_size=70_000), st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_is_zlibs_from_any_starting_value(data: bytes, start: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)


@given(st.binary(max_size=5_000), st.binary(max_size=5_000))
def test_a_running_crc_over_slices_is_the_crc_of_the_whole(a: bytes, b: bytes) -> None:
    assert crc32(b, crc32(a)) == zlib.crc32(a + b)


def test_a_record_checksummed_by_zlib_reads_back() -> None:
    body = b"Subject: x\r\n\r\n" + b"La de da de da\r\n" * 7_000
    old = zlib.crc32(body).to_bytes(4, "big") + body  # as an earlier release wrote it
    assert check_crc(old, "msg") == body
    assert with_crc(body) == old


@given(
    st.integers(min_value=0, max_value=2**63 - 1),
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([255, 256, 65535, 65536, 70_000]).map(lambda n: b"c" * n),
    ),
)
def test_a_journal_record_is_crc_and_msgpack_of_term_and_command(term: int, cmd: bytes) -> None:
    """The journal frames an entry itself, so as not to copy a body twice: the bytes must
    be what crc32 || msgpack([term, cmd]) always were (earlier releases read them)."""
    record = logstore._record(term, cmd)
    packed = msgpack.packb([term, cmd], use_bin_type=True)
    assert record == zlib.crc32(packed).to_bytes(4, "big") + packed
    assert logstore._decode(7, record) == (term, cmd)
