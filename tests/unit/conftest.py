from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mqnode.spool.store import QueueStore

from .kit import Transcript, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    s = open_store(tmp_path / "state")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def tx(store: QueueStore) -> Transcript:
    return Transcript(store)
