"""The spool: the queue that is replicated, and what it becomes in LMDB.

`commands` is the replicated schema and its codec; `model`, `addresses` and
`dsnparams` are the value types carried in it; `statemachine` applies committed
entries to `store` (LMDB, through mqnode/storage.py), purely: the same log
always gives the same state. They implement raft/contracts.py's StateMachine
and StateStore.
"""
