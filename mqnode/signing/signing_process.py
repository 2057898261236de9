"""SigningProcess: DKIM signing of big messages in a child process.

dkimpy canonicalizes a body with regular expressions over all of it, and
Python's `re` keeps the GIL through each call: signing 25 MiB took 2.1 s, in
which another thread of the process went up to 1.1 s without running. In the
node's process that thread is Raft's (election timeout 400-1400 ms): one big
signed message from the HTTP API (or over SMTP with `smtp_workers = 0`) could
cost the leader its leadership, and its event loop stood still throughout.

So the node signs bodies of `AWAY_FROM_BYTES` or more in one child process,
with the same dkim_* settings (read again at a reload), and smaller ones in
place (1 MiB: ~90 ms, its longest hold of the GIL ~50 ms). An SMTP worker has
no Raft thread, but in place a 25 MiB body held its event loop, and so every
session on it, for the whole two seconds: each worker has a child of its own.
The child is spawned, not forked (the node has threads, whose locks a fork
would copy), when the first big message comes; it exits when its parent does
(it watches it), and a child that dies is replaced at the next message, the
message in hand refused with 451 (SigningError).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mqnode.config import NodeConfig
from mqnode.signing.dkim_signer import DkimSigner, SigningError

AWAY_FROM_BYTES = 1024 * 1024
PARENT_CHECK_S = 1.0


class SigningProcess:
    def __init__(self, cfg: NodeConfig) -> None:
        self._cfg = cfg
        self._pool: ProcessPoolExecutor | None = None

    def reload(self, cfg: NodeConfig) -> None:
        """Sign with these settings from the next message on (a new child)."""
        self.close()
        self._cfg = cfg

    async def sign(self, message: bytes, at_s: int) -> tuple[bytes, tuple[str, ...]]:
        """What `DkimSigner.sign` gives, computed in the child."""
        pool = self._pool
        if pool is None:
            context = multiprocessing.get_context("spawn")
            pool = self._pool = ProcessPoolExecutor(
                1, mp_context=context, initializer=_load, initargs=(self._cfg, os.getpid())
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _sign, message, at_s)
        except BrokenProcessPool as exc:
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise SigningError(f"the signing process is gone: {exc}") from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


_signer: DkimSigner | None = None


def _load(cfg: NodeConfig, parent: int) -> None:
    """In the child: the signer, and a watch that ends the child with its parent."""
    global _signer
    _signer = DkimSigner.from_config(cfg)
    threading.Thread(target=_follow, args=(parent,), daemon=True).start()


def _follow(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _sign(message: bytes, at_s: int) -> tuple[bytes, tuple[str, ...]]:
    if _signer is None:
        raise SigningError("the signing process has no signer")
    return _signer.sign(message, at_s)
