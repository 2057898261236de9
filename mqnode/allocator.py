"""glibc malloc settings for the node's and the SMTP workers' processes.

A message body of a few MiB passes through several buffers of its size in a
process: read from the socket, joined, deflated, pickled, encrypted, framed,
journalled. glibc serves an allocation above its mmap threshold (128 KiB at
start, raised to the largest block freed since, at most 32 MiB) with a fresh
mapping and unmaps it when freed, and it gives free memory at the top of the
heap back to the kernel past its trim threshold. Either way the next buffer of
that size is faulted in again page by page: measured, framing one 1 MiB peer
message and reading it back took 3.7 ms, 2.5 ms of it in the kernel, against
1.2 ms with none when the memory stays; with attachments of 1 MiB, a tenth to
a fifth of each node's kernel time.

`keep_big_buffers` fixes the mmap threshold at glibc's maximum and raises the
trim threshold, so freed buffers are reused. The cost is memory a process
keeps after a burst of big messages: at most about `TRIM_THRESHOLD` free at
the heap's top, plus what fragmentation holds. Allocations over 32 MiB (a
catch-up batch of big entries can be one) are mapped and unmapped as before.
Not glibc (musl, macOS): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 128 * 1024 * 1024


def keep_big_buffers() -> bool:
    """Apply the settings above; whether glibc took them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.warning("malloc settings not taken: big buffers are mapped afresh each time")
    return done
