"""The planned-vs-actual aggregation (coordinator/accuracy.py): pure, no Redis."""

from __future__ import annotations

import pytest

from coordinator.accuracy import (
    SCHEMA,
    Marks,
    PlannedSlot,
    error_pct,
    format_table,
    planned_spans,
    planned_vs_actual,
)

T0 = 1_000.0  # unix s of the job's first task start
SLOTS = (
    PlannedSlot("a", 0.0, 6.0),
    PlannedSlot("b", 0.0, 4.0),
    PlannedSlot("b", 5.0, 9.0),  # a model planned in two assignments: [0, 9]
    PlannedSlot("c", 2.0, 10.0),
)


def test_planned_spans_take_earliest_start_and_latest_end() -> None:
    assert planned_spans(SLOTS) == {"a": (0.0, 6.0), "b": (0.0, 9.0), "c": (2.0, 10.0)}


def test_error_pct_is_planned_minus_actual_over_actual() -> None:
    assert error_pct(9.0, 10.0) == pytest.approx(-10.0)
    assert error_pct(12.0, 10.0) == pytest.approx(20.0)
    assert error_pct(5.0, None) is None and error_pct(5.0, 0.0) is None


def test_final_record_per_model_and_job() -> None:
    marks = {  # real seconds at time scale 0.5: actual = 2x the real offsets
        "a": Marks(T0, T0 + 3.5),
        "b": Marks(T0 + 0.1, T0 + 5.0),
        "c": Marks(T0 + 1.0, T0 + 5.5),
    }
    rec = planned_vs_actual(SLOTS, marks, {"a", "b", "c"}, t0=T0, scale=0.5, p50=10.0, p90=12.0,
                            actual=11.0)  # fmt: skip
    assert rec.final and rec.actual_s == 11.0
    assert rec.error_pct == pytest.approx(100 * (10.0 - 11.0) / 11.0)
    assert rec.error_p90_pct == pytest.approx(100 * (12.0 - 11.0) / 11.0)
    rows = {m.model: m for m in rec.models}
    assert [m.model for m in rec.models] == ["a", "b", "c"]  # planned start, then name
    assert (rows["b"].planned_start_s, rows["b"].planned_end_s) == (0.0, 9.0)
    assert rows["b"].actual_start_s == pytest.approx(0.2)
    assert rows["b"].actual_end_s == pytest.approx(10.0)
    assert rows["b"].error_pct == pytest.approx(-10.0)
    assert rows["a"].error_pct == pytest.approx(100 * (6.0 - 7.0) / 7.0)
    doc = rec.to_dict()
    assert doc["schema"] == SCHEMA and doc["final"] is True and doc["time_scale"] == 0.5
    want = {"planned_p50_s": 10.0, "planned_p90_s": 12.0, "actual_s": 11.0,
            "error_pct": rec.error_pct, "error_p90_pct": rec.error_p90_pct}  # fmt: skip
    assert doc["job"] == want
    assert doc["models"][1]["actual_end_s"] == pytest.approx(10.0)


def test_running_record_has_no_errors_for_open_models() -> None:
    marks = {"a": Marks(T0, T0 + 2.0), "b": Marks(T0 + 0.5, 0.0)}
    rec = planned_vs_actual(SLOTS, marks, {"a"}, t0=T0, scale=1.0, p50=10.0, p90=12.0,
                            actual=None)  # fmt: skip
    rows = {m.model: m for m in rec.models}
    assert not rec.final and rec.actual_s is None and rec.error_pct is None
    assert rows["a"].finished and rows["a"].error_pct == pytest.approx(200.0)
    assert rows["b"].actual_start_s == 0.5 and rows["b"].actual_end_s is None
    assert rows["b"].error_pct is None
    assert rows["c"].actual_start_s is None and not rows["c"].finished  # never started


def test_format_table_lists_every_model_and_the_job() -> None:
    rec = planned_vs_actual(SLOTS, {"a": Marks(T0, T0 + 7.0)}, {"a"}, t0=T0, scale=1.0,
                            p50=10.0, p90=12.0, actual=7.0)  # fmt: skip
    lines = format_table(rec.to_dict())
    assert "real s" in lines[0]
    assert len(lines) == 2 + 3 + 1
    assert lines[2].split() == ["a", "0.0-6.0", "0.0-7.0", "-14.3", "%"]
    assert lines[3].split()[:3] == ["b", "0.0-9.0", "---"]
    assert lines[-1].split()[:6] == ["job", "(P50)", "0.0-10.0", "0.0-7.0", "+42.9", "%"]
