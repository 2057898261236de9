"""RecordMemo: the messages last written or read, by the exact bytes of their record.

A message is read back soon after each write: its Claim and its RecordOutcome
decode the record the Enqueue and the Claim wrote, on every node, and the
leader's dispatcher decodes it to scan and to deliver. Decoding (checksum,
msgpack, a dataclass per recipient) is ~8 us a time, about nine times in a
message's life across a cluster: a twentieth of all the CPU a 1 KiB message
costs. This keeps the last messages put or decoded with their record's bytes,
and hands one back only when the bytes read now are those same bytes, so it
can never answer with a message the store does not hold: a rewrite, a delete,
an aborted transaction or an installed snapshot leaves other bytes, which
are decoded (and checked) as ever. What it hands back is the object decoding
those bytes gives, equal field for field (`QueuedMessage` is frozen; tests
check that a record decodes to the message it was packed from).

Bounded by count and by the bytes of the records it holds (`MAX_RECORDS`,
`MAX_BYTES`), oldest put first out: a message is read back within seconds
of a write, and 4,096 cover several seconds at the rates a node takes. The
objects of a message take about five times its record (4,096 messages of
one recipient: 0.9 MB of records, 4.4 MB of objects), so a few MB of a
node's heap. Shared by the tick thread and readers on other threads: a
lookup is one dict read; a put or a drop takes the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from mqnode.spool.model import QueuedMessage

MAX_RECORDS = 4096
MAX_BYTES = 1024 * 1024


class RecordMemo:
    def __init__(self, max_bytes: int = MAX_BYTES, max_records: int = MAX_RECORDS) -> None:
        self._max = max_bytes
        self._max_records = max_records
        self._held: OrderedDict[str, tuple[bytes, QueuedMessage]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, queue_id: str, record: bytes) -> QueuedMessage | None:
        """The message whose record is exactly `record`, if one is held."""
        held = self._held.get(queue_id)
        if held is not None and held[0] == record:
            return held[1]
        return None

    def put(self, queue_id: str, record: bytes, msg: QueuedMessage) -> None:
        """Hold `msg` as what `record` (its packed record, as stored) decodes to."""
        size = len(record)
        if size > self._max:
            self.drop(queue_id)
            return
        with self._lock:
            held = self._held
            old = held.pop(queue_id, None)
            held[queue_id] = (record, msg)
            self._bytes += size if old is None else size - len(old[0])
            while self._bytes > self._max or len(held) > self._max_records:
                self._bytes -= len(held.popitem(last=False)[1][0])

    def drop(self, queue_id: str) -> None:
        with self._lock:
            old = self._held.pop(queue_id, None)
            if old is not None:
                self._bytes -= len(old[0])

    def __len__(self) -> int:
        return len(self._held)
