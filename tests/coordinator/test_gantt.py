"""Gantt spans from a plan document and task records (pure), and the chart file."""

from __future__ import annotations

import math
from pathlib import Path

from coordinator.gantt import Span, actual_spans, draw, planned_spans

PLAN = {"assignments": [
    {"unit": 0, "unit_name": "a", "model": "m/a", "start_s": 0.0, "end_s": 50.0,
     "gpu_groups": [{"node": "n0", "gpus": [0, 1]}]},
    {"unit": 1, "unit_name": "b", "model": "m/b", "start_s": 0.0, "end_s": 30.0,
     "gpu_groups": [{"node": "n0", "gpus": [2]}, {"node": "n1", "gpus": [0]}]},
    {"unit": 1, "unit_name": "b", "model": "m/b", "start_s": math.nan, "end_s": math.nan,
     "gpu_groups": [{"node": "n0", "gpus": [3]}]},  # skipped by a re-plan: not drawn
]}  # fmt: skip


def test_planned_spans_one_per_gpu_and_skipped_left_out() -> None:
    spans = planned_spans(PLAN)
    assert sorted(s.gpu for s in spans) == ["n0:0", "n0:1", "n0:2", "n1:0"]
    assert Span("n0:2", "m/b", "b", 0.0, 30.0) in spans


def test_actual_spans_in_job_seconds_with_preemptions_marked() -> None:
    tasks = [
        {"task_id": "t1", "unit": 0, "node": "n0", "gpus": [0], "sent_at": 1000.5,
         "ended_at": 1002.5},
        {"task_id": "t2", "unit": 1, "node": "n1", "gpus": [0], "sent_at": 1001.0,
         "ended_at": 0.0},  # still running: a point
        {"task_id": "t3", "unit": 1, "node": "n0", "gpus": [2], "sent_at": 0.0, "ended_at": 0.0},
    ]  # fmt: skip
    units = {0: ("a", "m/a"), 1: ("b", "m/b")}
    spans = actual_spans(tasks, units, started_at=1000.0, time_scale=0.5, preempted={"t1"})
    assert spans == [Span("n0:0", "m/a", "a", 1.0, 5.0, True), Span("n1:0", "m/b", "b", 2.0, 2.0)]


def test_draw_writes_a_png(tmp_path: Path) -> None:
    actual = [Span("n0:0", "m/a", "a", 0.0, 20.0, True), Span("n0:0", "m/b", "b", 21.0, 40.0)]
    png = draw(planned_spans(PLAN), actual, tmp_path / "sub" / "g.png", "job x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
