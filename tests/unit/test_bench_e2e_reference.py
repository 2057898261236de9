"""`python -m bench --only e2e` measures the Postfix end-to-end reference itself, once."""

from __future__ import annotations

from typing import Any

import pytest

from bench import postfix, workloads
from bench.runners import Row

PARAMS = {"messages": 100, "sessions": 20, "size": 1024, "recipients": 1}


def _measured(calls: list[Any]) -> Any:
    def measure(*args: Any, **kw: Any) -> tuple[postfix.RefRow, postfix.RefRow]:
        calls.append(args)
        accept = postfix.RefRow("Postfix accept", 100, 0.1, 1000.0)
        return accept, postfix.RefRow("Postfix end to end", 100, 0.125, 800.0, "relay 20")

    return measure


def test_measured_when_the_accept_step_did_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(postfix, "available", lambda *a, **k: None)
    monkeypatch.setattr(postfix, "measure_postfix", _measured(calls))
    out = workloads.Results()
    workloads._postfix_end_to_end(workloads.QUICK, PARAMS, lambda step: None, out)
    assert len(calls) == 1
    (row,) = out.rows
    assert (row.workload, row.name, row.rate) == ("e2e", "Postfix end to end", 800.0)
    assert row.params == {**PARAMS, "generator": workloads.SMTP_SOURCE}


def test_not_measured_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(postfix, "available", lambda *a, **k: None)
    monkeypatch.setattr(postfix, "measure_postfix", _measured(calls))
    done = Row("e2e", "Postfix end to end", {**PARAMS, "generator": workloads.SMTP_SOURCE}, 900.0)
    out = workloads.Results(rows=[done])
    workloads._postfix_end_to_end(workloads.QUICK, PARAMS, lambda step: None, out)
    assert calls == [] and out.rows == [done]


def test_a_missing_postfix_is_a_skipped_row_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(postfix, "available", lambda *a, **k: "postfix not installed")
    out = workloads.Results()
    workloads._postfix_end_to_end(workloads.QUICK, PARAMS, lambda step: None, out)
    (row,) = out.rows
    assert row.rate is None and row.note == "skipped: postfix not installed"
