"""loads_bounded: a request's JSON decoded with at most so many values.

The request's bytes are limited (a message at its largest, base64), but not
what they decode to: 20 MiB of `[[],[],...]` is seven million lists, ~450 MB
of objects, and `json.loads` builds them in C without letting another thread
run. In the node's process that starved Raft's tick thread for three seconds:
the leader lost its leadership to one request.

A document whose commas and brackets (counted in C; those inside strings too,
so an upper bound on its values) are at most `FAST_VALUES` is decoded by
`json.loads` as before. Any other goes through the json module's Python
scanner, which reads strings with the same C code (a big body or attachment
costs what it did) but counts each value: past `max_values` it stops with
TooManyValues. That scanner runs as Python bytecode, so other threads get their
turns while it works.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from collections.abc import Callable
from typing import Any

FAST_VALUES = 20_000

Scan = Callable[[str, int], tuple[Any, int]]
# The json module's own parts (public names of it, not in typeshed's stubs).
_ARRAY: Callable[..., Any] = json.decoder.JSONArray  # type: ignore[attr-defined]
_OBJECT: Callable[..., Any] = json.decoder.JSONObject  # type: ignore[attr-defined]
_PY_SCANNER: Callable[[json.JSONDecoder], Scan] = json.scanner.py_make_scanner  # type: ignore[attr-defined]


class TooManyValues(ValueError):
    pass


def loads_bounded(raw: bytes, max_values: int) -> Any:
    """`json.loads(raw)`, or TooManyValues (a ValueError) past `max_values` values."""
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") <= FAST_VALUES:
        return json.loads(raw)
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _CountingDecoder(max_values).decode(text)


class _CountingDecoder(json.JSONDecoder):
    def __init__(self, max_values: int) -> None:
        super().__init__()
        self._left = max_values
        self._max = max_values

        def parse_array(s_and_end: tuple[str, int], scan_once: Scan) -> Any:
            return _ARRAY(s_and_end, self._counted(scan_once))

        def parse_object(
            s_and_end: tuple[str, int], strict: bool, scan_once: Scan, *args: Any
        ) -> Any:
            return _OBJECT(s_and_end, strict, self._counted(scan_once), *args)

        self.parse_array = parse_array
        self.parse_object = parse_object
        self.scan_once = _PY_SCANNER(self)

    def _counted(self, scan_once: Scan) -> Scan:
        def scan(s: str, idx: int) -> tuple[Any, int]:
            self._left -= 1
            if self._left < 0:
                raise TooManyValues(f"more than {self._max} values in the JSON document")
            return scan_once(s, idx)

        return scan
