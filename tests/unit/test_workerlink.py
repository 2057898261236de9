"""The node <-> SMTP worker link over a real socket pair: answers, errors, the node's death."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mqnode.errors import (
    BackpressureError,
    CommitTimeoutError,
    NoLeaderError,
    StoreFullError,
    SubmitError,
)
from mqnode.smtp.worker_link import (
    CLOSE,
    FAILED,
    FILL,
    OPEN,
    OPENED,
    RESULT,
    SUBMIT,
    Link,
    error_from,
    error_kind,
)
from mqnode.smtp.worker_process import NodeLink
from mqnode.spool.commands import (
    BIG_ENTRIES,
    BIG_ENTRIES_LEVEL,
    SMALL_ENTRIES,
    Enqueue,
    PutChunk,
    from_wire,
)

CMD = Enqueue(
    queue_id="Q1",
    received_ms=1,
    mail_from="a@example.org",
    recipients=("b@example.org",),
    body=b"Subject: x\r\n\r\nhi\r\n",
    upload_id="",
    chunks=0,
    body_size=19,
    body_sha256=b"\0" * 32,
    idem_key=b"\1" * 32,
    message_id="<m@x>",
    client="127.0.0.1",
    node_id="n1",
)

NodeSide = Callable[[Link, list[Any]], None]
_OPEN_LINKS: list[Link] = []


async def _pair(node_side: NodeSide, timeout_s: float = 5.0) -> tuple[NodeLink, Link]:
    """A worker's NodeLink and a node-side Link answering with `node_side`."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    worker = NodeLink(timeout_s)
    await loop.create_unix_connection(lambda: worker.link, sock=a)
    holder: list[Link] = []
    node = Link(lambda msg: node_side(holder[0], msg), lambda: None)
    holder.append(node)
    await loop.create_unix_connection(lambda: node, sock=b)
    _OPEN_LINKS.extend((worker.link, node))
    return worker, node


def _run(test: Callable[[], Awaitable[None]]) -> None:
    async def run_and_close() -> None:
        try:
            await asyncio.wait_for(test(), 10)
        finally:
            for link in _OPEN_LINKS:
                link.close()
            _OPEN_LINKS.clear()
            await asyncio.sleep(0.01)  # the transports close on the next turn

    asyncio.run(run_and_close())


def test_submit_round_trip_many_in_one_turn() -> None:
    seen: list[Any] = []

    def node_side(link: Link, msg: list[Any]) -> None:
        assert msg[0] == SUBMIT
        cmd = from_wire(msg[2])
        seen.append(cmd)
        link.send([RESULT, msg[1], "queued", cmd.queue_id])  # type: ignore[union-attr]

    async def test() -> None:
        worker, _ = await _pair(node_side)
        results = await asyncio.gather(*(worker.submit(CMD) for _ in range(200)))
        assert results == [("queued", "Q1")] * 200
        assert seen[0] == CMD and len(seen) == 200

    _run(test)


@pytest.mark.parametrize(
    "error",
    [
        NoLeaderError("no leader"),
        CommitTimeoutError("late"),
        BackpressureError("busy"),
        StoreFullError("full"),
        SubmitError("not queued: x"),
    ],
)
def test_node_errors_reach_the_client_as_the_node_would_answer(error: SubmitError) -> None:
    def node_side(link: Link, msg: list[Any]) -> None:
        link.send([FAILED, msg[1], error_kind(error), str(error)])

    async def test() -> None:
        worker, _ = await _pair(node_side)
        with pytest.raises(SubmitError) as caught:
            await worker.submit(CMD)
        assert type(caught.value) is type(error)
        assert caught.value.smtp_reply() == error.smtp_reply()

    _run(test)
    assert error_from(error_kind(error), "t").smtp_code == error.smtp_code


def test_node_gone_fails_waiting_and_later_submissions_with_451() -> None:
    def node_side(link: Link, msg: list[Any]) -> None:
        link.close()  # the node dies with the submission unanswered

    async def test() -> None:
        worker, _ = await _pair(node_side)
        with pytest.raises(NoLeaderError):
            await worker.submit(CMD)
        await asyncio.wait_for(worker.gone.wait(), 2)
        with pytest.raises(NoLeaderError) as caught:
            await worker.submit(CMD)
        assert caught.value.smtp_reply().startswith("451 4.3.0")

    _run(test)


def test_silent_node_times_out_with_outcome_unknown() -> None:
    async def test() -> None:
        worker, _ = await _pair(lambda link, msg: None, timeout_s=0.2)
        with pytest.raises(CommitTimeoutError):
            await worker.submit(CMD)

    _run(test)


def test_a_slot_granted_after_the_connection_left_is_given_back() -> None:
    got: list[list[Any]] = []
    pending: list[list[Any]] = []

    def node_side(link: Link, msg: list[Any]) -> None:
        got.append(msg)
        if msg[0] == OPEN:
            pending.append(msg)

    async def test() -> None:
        worker, node = await _pair(node_side)
        task = asyncio.create_task(worker.open("10.0.0.1"))
        while not pending:
            await asyncio.sleep(0.01)
        task.cancel()  # the client hung up while the node was deciding
        await asyncio.gather(task, return_exceptions=True)
        node.send([OPENED, pending[0][1], "10.0.0.1", None])
        for _ in range(100):
            if any(m[0] == CLOSE for m in got):
                break
            await asyncio.sleep(0.01)
        assert [CLOSE, "10.0.0.1"] in got

    _run(test)


def test_fill_ratio_pushed_and_bad_message_closes_the_link() -> None:
    async def test() -> None:
        worker, node = await _pair(lambda link, msg: None)
        node.send([FILL, 0.5])
        for _ in range(100):
            if worker.fill_ratio() == 0.5:
                break
            await asyncio.sleep(0.01)
        assert worker.fill_ratio() == 0.5
        assert node._transport is not None
        node._transport.write(b"\x05")  # a msgpack integer, not a message
        await asyncio.wait_for(worker.gone.wait(), 2)

    _run(test)


def test_the_workers_split_bodies_by_the_level_the_node_pushes() -> None:
    async def test() -> None:
        worker, node = await _pair(lambda link, msg: None)
        assert worker.entry_sizes() == SMALL_ENTRIES  # until the node says otherwise
        node.send([FILL, 0.1, 0, BIG_ENTRIES_LEVEL])
        for _ in range(100):
            if worker.entry_sizes() == BIG_ENTRIES:
                break
            await asyncio.sleep(0.01)
        assert worker.entry_sizes() == BIG_ENTRIES
        node.send([FILL, 0.1, 0, BIG_ENTRIES_LEVEL - 1])  # an older member joined
        for _ in range(100):
            if worker.entry_sizes() == SMALL_ENTRIES:
                break
            await asyncio.sleep(0.01)
        assert worker.entry_sizes() == SMALL_ENTRIES

    _run(test)


def test_a_whole_big_chunk_crosses_the_link() -> None:
    got: list[Any] = []

    def node_side(link: Link, msg: list[Any]) -> None:
        got.append(from_wire(msg[2]))
        link.send([RESULT, msg[1], "ok", ""])

    async def test() -> None:
        worker, _node = await _pair(node_side)
        chunk = PutChunk("Q1", 0, b"c" * BIG_ENTRIES.chunk, 1)
        assert await worker.submit(chunk) == ("ok", "")
        assert got == [chunk]

    _run(test)
