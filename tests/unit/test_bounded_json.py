"""api/bounded_json.loads_bounded: json.loads's answers, with a bound on the values."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqnode.api import bounded_json
from mqnode.api.bounded_json import TooManyValues, loads_bounded

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=60,
)


@settings(max_examples=300)
@given(doc=_JSON)
def test_the_counting_scanner_decodes_as_json_loads(doc: Any) -> None:
    raw = json.dumps(doc, ensure_ascii=False).encode()
    assert bounded_json._CountingDecoder(10**6).decode(raw.decode()) == json.loads(raw)
    assert loads_bounded(raw, 10**6) == json.loads(raw)


def test_a_document_past_the_bound_stops_early_in_little_memory() -> None:
    raw = b"[" + b"[]," * (7 * 1024 * 1024) + b"[]]"  # 21 MiB: ~7 million lists
    tracemalloc.start()
    try:
        with pytest.raises(TooManyValues, match="more than 100000 values"):
            loads_bounded(raw, 100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, peak  # json.loads: ~450 MB


def test_big_strings_full_of_commas_are_read_whole() -> None:
    text = "one, two, three [four] {five}\n" * 200_000  # 6 MB; its commas count as values
    doc = {"text": text, "to": [f"r{i}@x.test" for i in range(1000)]}
    raw = json.dumps(doc).encode()
    assert raw.count(b",") > bounded_json.FAST_VALUES  # the counting path
    assert loads_bounded(raw, 5000) == doc
    assert loads_bounded(json.dumps(doc).encode("utf-16"), 5000) == doc


def test_other_threads_run_while_a_big_document_is_counted() -> None:
    # json.loads holds the GIL for its whole run: the node's Raft thread stood still
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    raw = b"[" + b"0," * 400_000 + b"0]"
    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.01)
        before = ticks
        with pytest.raises(TooManyValues):
            loads_bounded(raw, 300_000)
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    assert during >= 3, during
