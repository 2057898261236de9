"""Record checksums (storage.crc32, ISA-L) are zlib's CRC-32: data written by any release reads.

Journal entries, state records and snapshot files written before the checksum moved
to ISA-L carry zlib.crc32 values; a differing value would make every one of them
"corrupt" after an upgrade.
"""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

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
