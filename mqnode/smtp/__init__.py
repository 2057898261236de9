"""SMTP ingress: sessions in, `Enqueue` commands out, `250` only after the commit.

`protocol` is aiosmtpd's session with mqnode's limits, TLS and AUTH; `handler`
turns a transaction into queue commands and submits them; `data` reads DATA in
large pieces; `auth` and `ratelimit` gate clients; `front` builds all of it
from a NodeConfig, identically in the node and in a worker process
(`worker_process`), which commits through the node over `worker_link`;
`worker_pool` is the node's side of those processes.
"""
