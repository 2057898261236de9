"""Bench results out: a JSON file, markdown tables for docs/benchmarks.md, PNG plots.

The markdown gives each workload its own table; acceptance rows carry their
ratio to the faster aiosmtpd null handler (asyncio or uvloop) and to Postfix
when that row ran (each within one load generator), so a reader sees where
each target stands.
Plots (matplotlib, headless): throughput over time through a leader kill, and
the DATA-to-250 latency distribution at 50% and 90% of peak.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.runners import Row

NULLS = ("aiosmtpd null handler", "aiosmtpd null handler, uvloop")
OURS = "ours"
POSTFIX = {
    "accept": "Postfix accept",
    "e2e": "Postfix end to end",
    "sessions": "Postfix accept",
    "paired": "Postfix accept",
    "paired-e2e": "Postfix end to end",
    "paired-dkim": "Postfix + OpenDKIM milter accept",
    "paired-suppression": "Postfix accept",
}


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], series: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "series": series}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _params(p: dict[str, Any]) -> str:
    keys = ("size", "recipients", "sessions", "messages", "offered_per_s", "rounds", "round")
    return ", ".join(f"{k}={p[k]}" for k in keys if k in p)


def _group_ratio(rows: list[Row], row: Row, names: tuple[str, ...]) -> float | None:
    """`row`'s rate over the best rate among rows called `names` in the same group.

    A group is the same workload, size, recipients, sessions and load
    generator: a ratio never mixes our Python generator with smtp-source.
    """

    def key(r: Row) -> tuple[Any, ...]:
        p = r.params
        return (
            r.workload,
            p.get("size"),
            p.get("recipients", 1),
            p.get("sessions"),
            p.get("generator"),
            p.get("round"),  # paired: a ratio within one round
        )

    refs = [r.rate for r in rows if r.name in names and key(r) == key(row) and r.rate]
    if not refs or not row.rate:
        return None
    return row.rate / max(refs)


TABLE_WORKLOADS = (
    "accept",
    "paired",
    "e2e",
    "paired-e2e",
    "paired-dkim",
    "paired-suppression",
    "paired-api",
    "cost",
    "paired-large",
    "deep",
    "shaping",
    "latency",
    "sessions",
    "scaling",
)
WORKLOAD_ORDER = (*TABLE_WORKLOADS, "failover")
# The plot each workload's section shows (written under a stable name with --record).
PLOT_OF = {"failover": "failover-throughput", "latency": "latency-cdf"}


def markdown(command: str, meta: dict[str, Any], rows: list[Row]) -> str:
    """Every measured workload's table, for the terminal (or a bench/results file)."""
    out = [f"Bench suite, {meta['mode']} mode ({meta['started']})", "", f"    {command}", ""]
    for workload in WORKLOAD_ORDER:
        table = workload_table(workload, rows)
        if table:
            out += [f"### {workload}", "", *table, ""]
    return "\n".join(out)


def workload_table(workload: str, rows: list[Row], summary_only: bool = False) -> list[str]:
    """One workload's markdown table (no lines if it did not run).

    `summary_only`: of the paired workloads, only the median-over-rounds rows (the
    per-round rows stay in the JSON).
    """
    sel = [r for r in rows if r.workload == workload]
    if not sel:
        return []
    if workload == "failover":
        return _failover_table(sel)
    shown = [r for r in sel if not summary_only or r.params.get("round") in (None, "median")]
    out = [
        "| row | load generator | params | msg/s | x null handler | x Postfix "
        "| p50 ms | p99 ms | acked/attempted | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in shown:
        extra = ", ".join(f"{k}={v}" for k, v in r.extra.items() if k != "failover_s")
        note = "; ".join(x for x in (r.note, extra) if x)
        x_null = _group_ratio(rows, r, NULLS)
        x_postfix = _group_ratio(rows, r, (POSTFIX.get(workload, ""),))
        out.append(
            f"| {r.name} | {r.params.get('generator', OURS)} | {_params(r.params)} | "
            f"{_f(r.rate)} | {_f(x_null, 2)} | {_f(x_postfix, 2)} | {_f(r.p50_ms, 1)} | "
            f"{_f(r.p99_ms, 1)} | {r.acked}/{r.attempted} | {note} |"
        )
    return out


def _failover_table(sel: list[Row]) -> list[str]:
    out = [
        "| row | rounds | failover s (median) | max | each | lost | duplicated | acked/attempted |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in sel:
        e = r.extra
        each = ", ".join(f"{g:.2f}" for g in e.get("failover_s", []))
        out.append(
            f"| {r.name} | {r.params.get('rounds')} | {_f(e.get('failover_s_median'), 2)} | "
            f"{_f(e.get('failover_s_max'), 2)} | {each} | {e.get('lost')} | "
            f"{e.get('duplicated')} | {r.acked}/{r.attempted} |"
        )
    return out


def section(
    workload: str, command: str, meta: dict[str, Any], rows: list[Row], plot: str | None
) -> str:
    """The marked block of docs/benchmarks.md that `--record` rewrites for one workload."""
    lines = [
        _begin(workload),
        f"Measured {meta['started']} with `{command}` ({meta['mode']} mode) on "
        f"{meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}"
        + (f"; code at {meta['code']}." if meta.get("code") else ".")
        + (f" {meta['note']}" if meta.get("note") else ""),
        "",
        *workload_table(workload, rows, summary_only=True),
    ]
    if plot:
        lines += ["", f"![{workload}]({plot})"]
    lines.append(_end(workload))
    return "\n".join(lines)


def _begin(workload: str) -> str:
    return f"<!-- bench:{workload} begin: written by python -m bench --record -->"


def _end(workload: str) -> str:
    return f"<!-- bench:{workload} end -->"


def rewrite(doc: str, blocks: dict[str, str]) -> str:
    """`doc` with each workload's marked block replaced by `blocks[workload]`.

    A workload without a block yet gets one at the end, under its own heading.
    Everything outside the markers (the page's prose) is kept as it is.
    """
    for workload, block in blocks.items():
        begin, end = doc.find(_begin(workload)), doc.find(_end(workload))
        if begin >= 0 and end > begin:
            doc = doc[:begin] + block + doc[end + len(_end(workload)) :]
        else:
            doc = doc.rstrip("\n") + f"\n\n## {workload}\n\n{block}\n"
    return doc


def plots(directory: Path, prefix: str, series: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tl = series.get("failover_timeline")
    if tl and tl["t_s"]:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(tl["t_s"], tl["rate"], lw=1)
        if tl.get("fault_s") is not None:
            ax.axvline(tl["fault_s"], color="red", ls="--", label="kill -9 leader")
            ax.legend()
        ax.set_xlabel("seconds")
        ax.set_ylabel("250s per second (100 ms bins)")
        ax.set_title("Acceptance through a leader kill (3 nodes, 1 KiB)")
        written.append(_save(fig, directory / _name(prefix, "failover-throughput")))
    lat = {k: v for k, v in series.items() if k.startswith("latency_ms_") and v}
    if lat:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for key, values in sorted(lat.items()):
            n = len(values)
            label = _latency_label(key)
            ax.plot(values, [(i + 1) / n for i in range(n)], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("DATA to 250, ms (log)")
        ax.set_ylabel("fraction of messages")
        ax.set_title("Acceptance latency distribution (3 nodes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        written.append(_save(fig, directory / _name(prefix, "latency-cdf")))
    return written


def _latency_label(key: str) -> str:
    """latency_ms_50, latency_ms_90 (1 KiB), latency_ms_100k_50 (100 KiB, delivering),
    latency_ms_100k_50_queued (100 KiB, nothing delivered)."""
    match = re.fullmatch(r"latency_ms_(?:(\d+)k_)?(\d+)(_queued)?", key)
    if match is None:
        return key
    size, frac, queued = match.groups()
    label = f"{frac}% of peak, {size or 1} KiB"
    if size:
        label += ", queue growing" if queued else ", delivering"
    return label


def _name(prefix: str, kind: str) -> str:
    return f"{prefix}-{kind}.png" if prefix else f"{kind}.png"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def machine_meta(mode: str, started: str) -> dict[str, Any]:
    import os

    return {
        "mode": mode,
        "started": started,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "code": code_version(),
    }


def code_version() -> str:
    """The commit measured (with "+changes" when the work tree differs from it)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "mqnode", "bench"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+changes" if dirty else "")
