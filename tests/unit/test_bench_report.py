"""The bench suite's pure parts: ratios within one load generator, the failover outage, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import paired, report
from bench.loadgen import Attempt, LoadResult
from bench.runners import Row, percentile
from bench.workloads import QUICK, outage_s


def rows() -> list[Row]:
    ours = {"size": 1024, "recipients": 1, "generator": "ours"}
    src = {"size": 1024, "recipients": 1, "generator": "smtp-source"}
    return [
        Row("accept", "aiosmtpd null handler", dict(ours), rate=1000.0),
        Row("accept", "aiosmtpd null handler, uvloop", dict(ours), rate=1200.0),
        Row("accept", "aiosmtpd null handler", dict(src), rate=1500.0),
        Row("accept", "mqnode 3 nodes, to leader", dict(ours), rate=300.0),
        Row("accept", "mqnode 3 nodes, to leader", dict(src), rate=600.0),
        Row("accept", "Postfix accept", dict(src), rate=400.0),
    ]


def test_ratio_is_to_the_faster_null_handler_of_the_same_generator() -> None:
    r = rows()
    assert report._group_ratio(r, r[3], report.NULLS) == 300.0 / 1200.0
    assert report._group_ratio(r, r[4], report.NULLS) == 600.0 / 1500.0


def test_postfix_ratio_never_mixes_generators() -> None:
    r = rows()
    assert report._group_ratio(r, r[4], ("Postfix accept",)) == 1.5
    assert report._group_ratio(r, r[3], ("Postfix accept",)) is None


def test_sessions_rows_compare_only_at_the_same_session_count() -> None:
    src = {"size": 1024, "recipients": 1, "generator": "smtp-source"}
    r = [
        Row("sessions", "Postfix accept", {**src, "sessions": 10}, rate=1000.0),
        Row("sessions", "Postfix accept", {**src, "sessions": 40}, rate=1200.0),
        Row("sessions", "mqnode 3 nodes, to leader", {**src, "sessions": 10}, rate=900.0),
        Row("sessions", "mqnode 3 nodes, to leader", {**src, "sessions": 40}, rate=1800.0),
    ]
    postfix = (report.POSTFIX["sessions"],)
    assert report._group_ratio(r, r[2], postfix) == 0.9
    assert report._group_ratio(r, r[3], postfix) == 1.5
    text = report.markdown("python -m bench --only sessions", report.machine_meta("q", "t"), r)
    assert "### sessions" in text and "| 1.50 |" in text


def test_markdown_names_the_command_and_every_row() -> None:
    meta = report.machine_meta("quick", "2026-11-23 00:00 UTC")
    text = report.markdown("python -m bench", meta, rows())
    assert "    python -m bench" in text
    assert text.count("| mqnode 3 nodes, to leader |") == 2
    assert "| 1.50 |" in text  # smtp-source row against Postfix


def test_outage_is_the_longest_silence_around_the_kill() -> None:
    ends = [1.0, 1.1, 1.2, 1.3, 2.05, 2.9, 3.0, 3.1, 9.0]
    res = LoadResult([Attempt(f"<{i}>", "t", 250, "Q", 0.0, e) for i, e in enumerate(ends)])
    # The kill is at 2.0; 2.05 was already committed and on its way. The outage is
    # 2.05 -> 2.9; 3.1 -> 9.0 starts after the window and is not the failover.
    assert outage_s(res, 2.0, window_s=1.0) == pytest.approx(0.85)
    assert outage_s(res, None) is None


def test_percentile_and_plan_bounds() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert QUICK.count_for(5 * 1024 * 1024) >= 20  # never an empty row
    assert QUICK.count_for(1024) == QUICK.messages


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    report.write_json(path, {"mode": "quick"}, rows(), {"latency_ms_50": [1.0]})
    doc = json.loads(path.read_text())
    assert doc["rows"][0]["name"] == "aiosmtpd null handler"
    assert doc["series"]["latency_ms_50"] == [1.0]


def test_paired_summary_takes_ratios_within_rounds_and_skips_failed_ones() -> None:
    rates: dict[str, list[float | None]] = {
        paired.NULL: [2000.0, 3000.0, 2500.0],
        paired.IN_NODE: [1500.0, 1800.0, None],  # round 3 failed
        paired.IN_WORKERS: [1600.0, 2400.0, 2000.0],
        paired.POSTFIX: [1000.0, 2000.0, 1000.0],
    }
    params = {"messages": 100, "sessions": 20, "size": 1024}
    rows = {r.name: r for r in paired.summary(rates, params)}
    workers = rows[paired.IN_WORKERS]
    assert workers.rate == 2000.0 and workers.params["round"] == "median"
    # per round 1.6, 1.2, 2.0: the median of ratios, not the ratio of medians (2000/1000)
    assert "x Postfix per round 1.60 (1.20-2.00)" in workers.note
    node = rows[paired.IN_NODE]
    assert node.rate == 1650.0 and (node.acked, node.attempted) == (200, 300)
    assert "2 of 3 rounds" in node.note and "x Postfix per round 1.20 (0.90-1.50)" in node.note
    assert "x null handler" not in rows[paired.NULL].note


def test_paired_e2e_summary_compares_with_postfix_end_to_end_only() -> None:
    rates: dict[str, list[float | None]] = {
        paired.E2E_IN_NODE: [900.0, 1100.0],
        paired.E2E_IN_WORKERS: [1000.0, None],  # round 2: the sink did not get everything
        paired.POSTFIX_E2E: [1000.0, 1000.0],
    }
    params = {"messages": 100, "sessions": 20, "size": 1024}
    rows = {r.name: r for r in paired.summary(rates, params, "paired-e2e", (paired.POSTFIX_E2E,))}
    assert {r.workload for r in rows.values()} == {"paired-e2e"}
    assert "x Postfix per round 1.00 (0.90-1.10)" in rows[paired.E2E_IN_NODE].note
    assert "1 of 2 rounds" in rows[paired.E2E_IN_WORKERS].note
    assert "null handler" not in rows[paired.E2E_IN_NODE].note
    md = report.markdown(
        "python -m bench --only paired-e2e",
        {"mode": "quick", "started": "now", "cpus": 2, "python": "3.11"},
        list(rows.values()),
    )
    assert "### paired-e2e" in md


def test_record_rewrites_only_the_measured_workloads_sections() -> None:
    meta = report.machine_meta("full", "2026-12-06 07:00 UTC")
    page = "# Benchmarks\n\nprose kept\n\n## accept\n\n" + report.section(
        "accept", "python -m bench --full", meta, rows(), None
    )
    page += "\n\nmore prose\n\n## e2e\n\n<!-- bench:e2e begin: x -->old e2e<!-- bench:e2e end -->\n"
    newer = report.machine_meta("quick", "2026-12-07 08:00 UTC")
    block = report.section("accept", "python -m bench --only accept", newer, rows(), None)
    out = report.rewrite(page, {"accept": block})
    assert out.count("<!-- bench:accept begin") == 1 and "2026-12-07 08:00 UTC" in out
    assert "2026-12-06 07:00 UTC" not in out  # the old table is gone, not appended to
    assert "prose kept" in out and "more prose" in out and "old e2e" in out
    again = report.rewrite(out, {"accept": block})
    assert again == out  # recording the same result twice changes nothing
    fresh = report.rewrite(
        out, {"scaling": "<!-- bench:scaling begin -->s<!-- bench:scaling end -->"}
    )
    assert fresh.endswith("## scaling\n\n<!-- bench:scaling begin -->s<!-- bench:scaling end -->\n")


def test_paired_sections_show_the_median_rows_only() -> None:
    meta = report.machine_meta("full", "t")
    params = {"size": 1024, "sessions": 20, "messages": 10, "generator": "smtp-source"}
    r = [
        Row("paired", "Postfix accept", {**params, "round": 1}, rate=1000.0),
        Row("paired", "Postfix accept", {**params, "round": "median"}, rate=1000.0),
    ]
    text = report.section("paired", "python -m bench", meta, r, None)
    assert "round=median" in text and "round=1," not in text and "round=1 " not in text
