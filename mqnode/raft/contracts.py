"""What raft/ needs of the replicated state: small Protocols that spool/ implements.

As hashicorp/raft's FSM and SnapshotStore: nothing under raft/ imports the
queue's classes. node.py (the wiring) hands a RaftNode a `QueueStore` and a
`QueueStateMachine`, which satisfy these; tests may hand it anything that does.

The contract, on the implementer's side:

* `StateMachine.apply` is deterministic. It reads no clock, socket or
  randomness, only the entry and the transaction; the same log applied to the
  same start state gives the same state. It may raise `NewerFormatError` (an
  entry this build cannot read: the node stops applying) or any other error
  (the tick's applies are rolled back and retried). Its return value is
  handed, unread, to the submitter's `Done` callback.
* `StateStore` writes only on the tick thread, in one transaction per tick:
  `apply_txn` returns the open one (made on first use), `commit_apply` commits
  it, `abort_apply` drops it. The applied index it records is what a restart
  resumes from. A full map raises an error for which `map_filled` is true;
  `grow_for_apply` may make room so that committed entries still apply.
* For snapshots, `snapshot_txn` commits the tick's applies and returns a read
  transaction (with `abort()`) on exactly that state, which `copy_into` may
  copy from another thread while applies go on; `replace_from` swaps the whole
  state for such a copy (a follower installing the leader's snapshot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeVar


class ApplyTxn(Protocol):
    """The open write transaction of one tick: what RaftNode itself reads and writes in it."""

    def applied_index(self) -> int: ...

    def set_applied_index(self, index: int) -> None: ...


TxnT = TypeVar("TxnT", bound=ApplyTxn)
TxnT_co = TypeVar("TxnT_co", bound=ApplyTxn, covariant=True)
TxnT_contra = TypeVar("TxnT_contra", bound=ApplyTxn, contravariant=True)


class StateStore(Protocol[TxnT_co]):
    """The replicated state's durable storage (spool/store.py's QueueStore)."""

    @property
    def map_size_bytes(self) -> int: ...

    def applied_index(self) -> int: ...

    def apply_txn(self) -> TxnT_co: ...

    def commit_apply(self, refresh_fill: bool = False) -> None: ...

    def abort_apply(self) -> None: ...

    def fill_ratio(self) -> float: ...

    def used_bytes(self) -> int: ...

    def map_filled(self, exc: BaseException) -> bool: ...

    def grow_for_apply(self) -> bool: ...

    def snapshot_txn(self) -> Any: ...

    def copy_into(self, fd: int, txn: Any = None) -> None: ...

    def replace_from(self, data_file: Path) -> None: ...


class StateMachine(Protocol[TxnT_contra]):
    """Applies one committed entry (spool/statemachine.py's QueueStateMachine)."""

    def apply(self, index: int, entry: bytes, txn: TxnT_contra) -> Any: ...
