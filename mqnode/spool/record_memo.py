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

Bounded by the bytes of the records it holds (`MAX_BYTES`; Python's objects
for a message are a few times its record), oldest put first out. Shared by
the tick thread and readers on other threads: a lookup is one dict read; a
put or a drop takes the lock.
"""

from __future__ import annotations

import threading

from mqnode.spool.model import QueuedMessage

MAX_BYTES = 4 * 1024 * 1024  # ~15,000 records of a 1 KiB message with one recipient


class RecordMemo:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max = max_bytes
        self._held: dict[str, tuple[bytes, QueuedMessage]] = {}
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
        if len(record) > self._max:
            self.drop(queue_id)
            return
        with self._lock:
            old = self._held.pop(queue_id, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._held[queue_id] = (record, msg)
            self._bytes += len(record)
            while self._bytes > self._max:
                first = next(iter(self._held))
                self._bytes -= len(self._held.pop(first)[0])

    def drop(self, queue_id: str) -> None:
        with self._lock:
            old = self._held.pop(queue_id, None)
            if old is not None:
                self._bytes -= len(old[0])

    def __len__(self) -> int:
        return len(self._held)
