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


def markdown(command: str, meta: dict[str, Any], rows: list[Row]) -> str:
    out = [
        f"## Bench suite, {meta['mode']} mode ({meta['started']})",
        "",
        f"    {command}",
        "",
        f"Machine: {meta['cpus']} CPUs, Python {meta['python']}. {meta.get('note', '')}".rstrip(),
    ]
    for workload in ("accept", "paired", "e2e", "paired-e2e", "latency", "sessions", "scaling"):
        sel = [r for r in rows if r.workload == workload]
        if not sel:
            continue
        out += [
            "",
            f"### {workload}",
            "",
            "| row | load generator | params | msg/s | x null handler | x Postfix "
            "| p50 ms | p99 ms | acked/attempted | note |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in sel:
            extra = ", ".join(f"{k}={v}" for k, v in r.extra.items() if k != "failover_s")
            note = "; ".join(x for x in (r.note, extra) if x)
            x_null = _group_ratio(rows, r, NULLS)
            x_postfix = _group_ratio(rows, r, (POSTFIX.get(workload, ""),))
            out.append(
                f"| {r.name} | {r.params.get('generator', OURS)} | {_params(r.params)} | "
                f"{_f(r.rate)} | {_f(x_null, 2)} | {_f(x_postfix, 2)} | {_f(r.p50_ms, 1)} | "
                f"{_f(r.p99_ms, 1)} | {r.acked}/{r.attempted} | {note} |"
            )
    fail = [r for r in rows if r.workload == "failover"]
    if fail:
        out += [
            "",
            "### failover",
            "",
            "| row | rounds | failover s (median) | max | each | lost | duplicated "
            "| acked/attempted |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for r in fail:
            e = r.extra
            each = ", ".join(f"{g:.2f}" for g in e.get("failover_s", []))
            out.append(
                f"| {r.name} | {r.params.get('rounds')} | {_f(e.get('failover_s_median'), 2)} | "
                f"{_f(e.get('failover_s_max'), 2)} | {each} | {e.get('lost')} | "
                f"{e.get('duplicated')} | {r.acked}/{r.attempted} |"
            )
    return "\n".join(out) + "\n"


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
        written.append(_save(fig, directory / f"{prefix}-failover-throughput.png"))
    lat = {k: v for k, v in series.items() if k.startswith("latency_ms_") and v}
    if lat:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for key, values in sorted(lat.items()):
            n = len(values)
            ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{key[11:]}% of peak")
        ax.set_xscale("log")
        ax.set_xlabel("DATA to 250, ms (log)")
        ax.set_ylabel("fraction of messages")
        ax.set_title("Acceptance latency distribution (3 nodes, 1 KiB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        written.append(_save(fig, directory / f"{prefix}-latency-cdf.png"))
    return written


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
    }
