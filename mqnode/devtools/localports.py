"""free_loopback_ports: ports for local clusters (demo, tests, bench) that stay free.

A port found free by binding to port 0 comes from the ephemeral range, and is
closed again before the node binds it; in between, any outbound connection
may be given it as its local port, and the node then failed to start
(pysyncobj BindError, seen in the test suite). Ports below the ephemeral range
are never handed out that way.
"""

from __future__ import annotations

import os
import socket

HOST = "127.0.0.1"
FIXED_LO = 10000
_LINUX_DEFAULT = (32768, 60999)
# Each process starts at its own place and moves on, so concurrent runs rarely probe
# the same ports and a just-killed node's port is not handed out again at once.
_next = FIXED_LO + (os.getpid() * 7919) % 8000
# (k, n): this process probes only the k-th of n equal slices of the range (take_share).
_share = (0, 1)


def take_share(k: int, n: int) -> None:
    """Probe only the k-th of n slices from now on: processes that allocate ports at the
    same time (the test suite's parallel workers) then never pick the same free port.
    Probing and binding are two steps, so without this two of them could both find a
    port free and one node would fail to bind it."""
    global _share
    if not 0 <= k < n:
        raise ValueError(f"share {k} of {n}")
    _share = (k, n)


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            lo, hi = (int(v) for v in fh.read().split())
        return lo, hi
    except (OSError, ValueError):
        return _LINUX_DEFAULT


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1, free now and below the ephemeral range."""
    global _next
    k, n = _share
    span = (ephemeral_range()[0] - FIXED_LO) // n
    if span < 1000:
        return _kernel_ports(count)  # no room below the range: take the kernel's choice
    lo = FIXED_LO + k * span
    ports: list[int] = []
    for _ in range(span):
        port = lo + (_next - lo) % span
        _next = lo + (port + 1 - lo) % span
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports between {lo} and {lo + span}")


def _kernel_ports(count: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
