"""The queue: what is replicated and what it becomes.

`commands` is the replicated schema and its codec; `model`, `addresses` and
`dsnparams` are the value types carried in it; `statemachine` applies committed
entries to `store` (LMDB, the only module importing `lmdb`), purely: the same
log always gives the same state. `snapshot` is the snapshot file format,
`formats` keeps new command fields out of the log until every member reads
them, and `events` writes one log line per queue event.
"""
