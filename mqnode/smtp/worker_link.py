"""The link between a node process and one of its SMTP worker processes.

A Unix socket pair, one end inherited by the worker at start; each side sees
the other's death (even kill -9) as end-of-file at once. Messages are msgpack
lists, streamed back to back (msgpack's Unpacker finds the boundaries):

    worker -> node                          node -> worker
    [UP] (accepting on the listening sockets)
    [SUBMIT, id, command as list]           [RESULT, id, status, value]
                                            [FAILED, id, error kind, text]
    [OPEN, id, client key]                  [OPENED, id, client key, refusal or None]
    [CLOSE, client key]
    [MESSAGE, id, client key]               [ALLOWED, id, bool]
    [COUNTS, accepted, refused, signed by domain, signing failures, suppressed refused]
    [SUPPRESSED, id, [recipient, sender domain]]
                                            [VERDICT, id, why suppressed or None]
                                            [FILL, store fill ratio, suppression entries,
                                             the cluster's reads level]
                                            [DKIM, the dkim_* settings to sign with now]

Writes made in one event-loop turn leave in one system call: a commit answers a
batch of submissions at once. Limits: a message over `MAX_MESSAGE_BYTES` (a
body chunk or an inline body is at most 960 KiB, spool/commands.py) or one
that is not a list closes the link; both sides treat that like the other's
death.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgpack

from mqnode.errors import (
    BackpressureError,
    CommitTimeoutError,
    NoLeaderError,
    StoreFullError,
    SubmitError,
)
from mqnode.storage import pack_pieces

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SUBMIT, RESULT, FAILED, OPEN, OPENED, CLOSE, MESSAGE, ALLOWED, COUNTS, FILL, DKIM = range(1, 12)
SUPPRESSED, VERDICT, UP = 12, 13, 14

# SubmitError subclasses by name on the wire, so the worker answers the SMTP client
# exactly what the node would have (451 4.3.0, 452 4.3.1, ...).
_ERRORS: dict[str, type[SubmitError]] = {
    "no_leader": NoLeaderError,
    "timeout": CommitTimeoutError,
    "backpressure": BackpressureError,
    "full": StoreFullError,
    "submit": SubmitError,
}
_KINDS = {cls: kind for kind, cls in _ERRORS.items()}


def error_kind(exc: SubmitError) -> str:
    return _KINDS.get(type(exc), "submit")


def error_from(kind: str, text: str) -> SubmitError:
    return _ERRORS.get(kind, SubmitError)(text)


class Link(asyncio.Protocol):
    """One end of the socket pair: `send` a message, `on_message` for each received one."""

    def __init__(
        self, on_message: Callable[[list[Any]], None], on_closed: Callable[[], None]
    ) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=2 * MAX_MESSAGE_BYTES)
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
            for msg in self._unpacker:
                if not isinstance(msg, list) or not msg:
                    raise ValueError(f"not a message: {type(msg).__name__}")
                self._on_message(msg)
        except (ValueError, TypeError, IndexError, KeyError, msgpack.BufferFull) as exc:
            # a message of the wrong shape: the other side is not the code we run
            log.error("worker link: bad message (%r); closing it", exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.closed:
            self.closed = True
            self._on_closed()

    def send(self, msg: list[Any]) -> None:
        if self._transport is None or self._loop is None:
            return
        self._out += pack_pieces(msg)  # a body chunk is not copied (writelines below)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.writelines(out)  # no joined copy of the bodies in them

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()
