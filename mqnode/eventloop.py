"""run_event_loop: the node's and the SMTP workers' event loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any

from mqnode.allocator import keep_big_buffers


def run_event_loop(coro: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (a faster event loop for the SMTP side), else asyncio.

    What is alive before the loop starts (modules, classes, the configuration: 50,000
    to 60,000 objects) lives as long as the process, so it is frozen out of the cycle
    collector. Otherwise every full collection walks all of it, in busy and idle
    processes alike: 2.5-3.5% of the machine's CPU under load (perf, 100 KiB and 1 MiB
    through a 3-node cluster with SMTP workers), against 0.2-0.7% frozen.

    Big buffers are kept for reuse rather than mapped afresh (mqnode/allocator.py).
    """
    keep_big_buffers()
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)
