"""The event log as the tests read it: one JSON object per line (mqnode/events.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUTCOMES = ("delivered", "deferred", "bounced")


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in the file; a line another node is still writing is left out."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
