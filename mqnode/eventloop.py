"""run_event_loop: the node's and the SMTP workers' event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_event_loop(coro: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (a faster event loop for the SMTP side), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)
