"""`python -m bench.chaos` replaces docs/reliability.md, keeping the section that
`python -m bench.netchaos` writes; bench.netchaos replaces only its own section."""

from __future__ import annotations

from pathlib import Path

from bench import netchaos
from bench.chaos import write_markdown
from tests.support.chaos import Report


def _report(name: str, acked: int) -> Report:
    return Report(name, acked + 5, acked, 5, 0, 0, 0, 0.5)


def test_a_new_run_replaces_the_table_and_keeps_the_netchaos_section(tmp_path: Path) -> None:
    out = tmp_path / "reliability.md"
    write_markdown([_report("kill-leader", 100)], "python -m bench.chaos --seed 1", out)
    first = out.read_text()
    assert "| kill-leader | 105 | 100 |" in first and "## " not in first
    netchaos.write(out, [netchaos.BEGIN, "## Network faults", "", "| a table |", netchaos.END])
    out.write_text(out.read_text() + "\n## Run log of 2026-11-24\n\nGone next time.\n")
    write_markdown([_report("power-loss", 42)], "python -m bench.chaos --seed 2", out)
    text = out.read_text()
    assert "--seed 2" in text and "| power-loss | 47 | 42 |" in text
    assert "--seed 1" not in text and "kill-leader | 105" not in text
    assert text.count("## Network faults") == 1 and "| a table |" in text
    assert "Run log of" not in text
    netchaos.write(out, [netchaos.BEGIN, "## Network faults", "", "| new |", netchaos.END])
    text = out.read_text()
    assert "| new |" in text and "| a table |" not in text and "| power-loss | 47" in text


def test_a_missing_file_is_written_whole(tmp_path: Path) -> None:
    out = tmp_path / "new.md"
    write_markdown([_report("kill-two", 3)], "python -m bench.chaos", out)
    assert out.read_text().startswith("# Reliability: fault runs")


def test_a_scenario_note_goes_to_the_notes_column(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    report = _report("partition-follower", 9)
    report.note = "leader term 1 -> 1"
    write_markdown([report], "python -m bench.chaos", out)
    assert "| partition-follower | 14 | 9 | 5 | 0 | 0 | 0 | 0.50 | leader term 1 -> 1 |" in (
        out.read_text()
    )
