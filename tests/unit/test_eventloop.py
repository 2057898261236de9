"""run_event_loop freezes what was alive at start out of the cycle collector."""

from __future__ import annotations

import gc

from mqnode.eventloop import run_event_loop


def test_what_lives_at_start_is_frozen_before_the_loop_runs() -> None:
    seen: list[int] = []

    async def main() -> None:
        seen.append(gc.get_freeze_count())

    gc.unfreeze()
    try:
        run_event_loop(main())
    finally:
        gc.unfreeze()
    assert seen and seen[0] > 1000, seen
