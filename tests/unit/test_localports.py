"""free_loopback_ports: distinct, bindable, and below the ephemeral range."""

from __future__ import annotations

import socket

import pytest

from mqnode.devtools import localports
from mqnode.devtools.localports import FIXED_LO, ephemeral_range, free_loopback_ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    lo, _hi = ephemeral_range()
    ports = free_loopback_ports(12)
    assert len(set(ports)) == 12
    assert all(FIXED_LO <= p < lo for p in ports)
    for p in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = free_loopback_ports(1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        monkeypatch.setattr(localports, "_next", taken)
        ports = free_loopback_ports(3)
    assert taken not in ports
    assert ports[0] > taken


def test_calls_move_on() -> None:
    a, b = free_loopback_ports(1), free_loopback_ports(1)
    assert a != b


def test_shares_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel test workers each take a share: their probes never meet."""
    lo, _hi = ephemeral_range()
    seen: list[set[int]] = []
    for k in range(2):
        monkeypatch.setattr(localports, "_share", (0, 1))
        localports.take_share(k, 2)
        seen.append(set(free_loopback_ports(20)))
    span = (lo - FIXED_LO) // 2
    assert all(FIXED_LO <= p < FIXED_LO + span for p in seen[0])
    assert all(FIXED_LO + span <= p < FIXED_LO + 2 * span for p in seen[1])
    with pytest.raises(ValueError):
        localports.take_share(2, 2)
