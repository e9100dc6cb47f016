"""Planned vs actual times of a job, per model and for the whole job (pure; no Redis).

The coordinator keeps, per model, the unix times of its first task start and of its last
committed output (:class:`Marks`), on the same clock as the job's actual makespan: the first
task start is the ``at`` of a ``started`` event, a commit time is when the coordinator applied
the ``commit`` event. :func:`planned_vs_actual` turns them, with the plan's per-assignment
start and end, into a :class:`PlannedVsActual`, stored as JSON (:meth:`PlannedVsActual.to_dict`)
in the job's state hash under ``planned_vs_actual`` (docs/runtime.md, "Planned vs actual").

Times are seconds from the job's first task start: planner seconds for the plan, and real
seconds divided by the workers' time scale for the actual side (simulated seconds on sim
workers, real seconds on vLLM workers). Errors are ``100 * (planned - actual) / actual``, so a
negative error means the plan was optimistic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SCHEMA = 1  # version of the stored ``planned_vs_actual`` document


@dataclass(frozen=True, slots=True)
class PlannedSlot:
    """One plan assignment, reduced to what the comparison needs."""

    model: str
    start_s: float  # s from job start (planner clock)
    end_s: float  # s from job start (planner clock)


@dataclass(frozen=True, slots=True)
class Marks:
    """What the coordinator saw of one model; 0 = not yet."""

    start_at: float = 0.0  # unix s; the first start of one of the model's tasks
    end_at: float = 0.0  # unix s; the last commit of one of the model's outputs


@dataclass(frozen=True, slots=True)
class ModelAccuracy:
    """Planned vs actual span of one model."""

    model: str
    planned_start_s: float  # s from job start; earliest planned start of its assignments
    planned_end_s: float  # s from job start; latest planned end (the planned span)
    actual_start_s: float | None  # s from job first task start; None = never started
    actual_end_s: float | None  # s from job first task start; last commit so far
    finished: bool  # every request of the model committed or failed
    error_pct: float | None  # % = 100 * (planned_end - actual_end) / actual_end; None = open


@dataclass(frozen=True, slots=True)
class PlannedVsActual:
    """The whole record: the job line and one row per model (in planned start order)."""

    final: bool  # the job is done (else: actual so far)
    time_scale: float  # real s per engine s of the job's workers (1 on vLLM workers)
    planned_p50_s: float  # s; planned makespan, P50 over length draws
    planned_p90_s: float  # s; planned makespan, P90
    actual_s: float | None  # s; actual makespan (None while running)
    error_pct: float | None  # % = 100 * (planned_p50 - actual) / actual
    error_p90_pct: float | None  # % = 100 * (planned_p90 - actual) / actual
    models: tuple[ModelAccuracy, ...]

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON document (``schema`` first; see the module docstring)."""
        return {
            "schema": SCHEMA, "final": self.final, "time_scale": self.time_scale,
            "job": {"planned_p50_s": self.planned_p50_s, "planned_p90_s": self.planned_p90_s,
                    "actual_s": self.actual_s, "error_pct": self.error_pct,
                    "error_p90_pct": self.error_p90_pct},
            "models": [_model_dict(m) for m in self.models],
        }  # fmt: skip


def _model_dict(m: ModelAccuracy) -> dict[str, Any]:
    return {
        "model": m.model, "planned_start_s": m.planned_start_s, "planned_end_s": m.planned_end_s,
        "actual_start_s": m.actual_start_s, "actual_end_s": m.actual_end_s,
        "finished": m.finished, "error_pct": m.error_pct,
    }  # fmt: skip


def error_pct(planned: float, actual: float | None) -> float | None:
    """``100 * (planned - actual) / actual``; None without a positive actual."""
    if actual is None or actual <= 0:
        return None
    return 100.0 * (planned - actual) / actual


def planned_spans(slots: Iterable[PlannedSlot]) -> dict[str, tuple[float, float]]:
    """Per model: (earliest planned start, latest planned end), s from job start."""
    out: dict[str, tuple[float, float]] = {}
    for s in slots:
        lo, hi = out.get(s.model, (s.start_s, s.end_s))
        out[s.model] = (min(lo, s.start_s), max(hi, s.end_s))
    return out


def _since(at: float, t0: float, scale: float) -> float | None:
    return (at - t0) / scale if at and t0 else None


def model_accuracy(
    model: str, planned: tuple[float, float], marks: Marks, t0: float, scale: float,
    finished: bool,
) -> ModelAccuracy:  # fmt: skip
    """One model's row; ``t0`` is the job's first task start (unix s)."""
    end = _since(marks.end_at, t0, scale)
    return ModelAccuracy(
        model=model, planned_start_s=planned[0], planned_end_s=planned[1],
        actual_start_s=_since(marks.start_at, t0, scale), actual_end_s=end,
        finished=finished, error_pct=error_pct(planned[1], end) if finished else None,
    )  # fmt: skip


def planned_vs_actual(
    slots: Iterable[PlannedSlot], marks: Mapping[str, Marks], finished: Iterable[str], *,
    t0: float, scale: float, p50: float, p90: float, actual: float | None,
) -> PlannedVsActual:  # fmt: skip
    """The record of a job.

    Args:
        slots: the plan's assignments (model, planned start and end).
        marks: per model, the first task start and last commit seen (unix s).
        finished: models whose every request is committed or failed.
        t0: the job's first task start (unix s; 0 = not started).
        scale: real seconds per engine second (1 on real engines).
        p50, p90: planned makespan (s).
        actual: actual makespan (s), None while the job runs.

    Returns:
        Models in order of planned start (then name); job errors only once ``actual`` is known.
    """
    spans = planned_spans(slots)
    done = set(finished)
    rows = tuple(
        model_accuracy(m, spans[m], marks.get(m, Marks()), t0, scale, m in done)
        for m in sorted(spans, key=lambda m: (spans[m][0], m))
    )
    return PlannedVsActual(
        final=actual is not None, time_scale=scale, planned_p50_s=p50, planned_p90_s=p90,
        actual_s=actual, error_pct=error_pct(p50, actual), error_p90_pct=error_pct(p90, actual),
        models=rows,
    )  # fmt: skip


def format_table(doc: Mapping[str, Any]) -> list[str]:
    """Human lines of a stored record: a heading, one line per model, then the job line."""
    scale = doc.get("time_scale") or 1.0
    clock = "real s" if scale == 1.0 else f"simulated s at time scale {scale:g}"
    state = "" if doc.get("final") else "; actual so far, the job runs"
    lines = [f"  planned vs actual (s from the first task start, {clock}{state}):",
             f"    {'model':<40} {'planned s':>15} {'actual s':>15} {'error':>8}"]  # fmt: skip
    for m in doc.get("models", []):
        lines.append(
            f"    {m['model']:<40} {_span(m['planned_start_s'], m['planned_end_s']):>15}"
            f" {_span(m['actual_start_s'], m['actual_end_s']):>15} {_pct(m['error_pct']):>8}"
        )
    j = doc.get("job", {})
    lines.append(
        f"    {'job (P50)':<40} {_span(0.0, j.get('planned_p50_s')):>15}"
        f" {_span(0.0, j.get('actual_s')):>15} {_pct(j.get('error_pct')):>8}"
        f"  (P90 {_num(j.get('planned_p90_s'))} s, {_pct(j.get('error_p90_pct'))})"
    )
    return lines


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _span(a: float | None, b: float | None) -> str:
    return f"{_num(a)}-{_num(b)}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f} %"


def replan_line(st: Mapping[str, Any]) -> str | None:
    """What ``samullm run`` and ``samullm status`` say about a re-plan once routes were known."""
    rp = st.get("replan")
    if not isinstance(rp, dict):
        return None
    if "skipped" in rp:
        return f"  routes known: plan kept ({rp['skipped']})"
    return (f"  routes known at {float(rp['at_s']):.1f} s: re-planned the rest, P50 "
            f"{float(st.get('replanned_p50_s', 0)):.1f} s (P90 "
            f"{float(st.get('replanned_p90_s', 0)):.1f} s)")  # fmt: skip


def calibration_line(st: Mapping[str, Any]) -> str | None:
    """Measured / believed step latency per model (coordinator/calibration.py), when measured."""
    cal = st.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return None
    parts = [f"{m}: steps {c['latency_scale']:.2f}x ({c['windows']} windows), lengths "
             f"{c.get('length_scale', 1.0):.2f}x ({c.get('length_exact', 0)} exact, "
             f"{c.get('length_bounds', 0)} lower bounds)"
             for m, c in sorted(cal.items())]  # fmt: skip
    return "\n".join(["  measured against belief:", *(f"    {p}" for p in parts)])


def adjust_lines(st: Mapping[str, Any]) -> list[str]:
    """What run-time adjustment did (coordinator/adjust.py): each switch, then the last look."""
    out = []
    for sw in st.get("switches") or []:
        stopped = ", ".join(sw["stopped"]) or "none"
        out.append(f"  re-planned at {float(sw['at_s']):.0f} s ({sw['why']}): {sw['chose']} plan, "
                   f"P50 left {float(sw['p50_before_s']):.0f} -> {float(sw['p50_after_s']):.0f} s"
                   f"; stopped: {stopped}")  # fmt: skip
    look = st.get("adjust")
    if isinstance(look, dict):
        out.append(f"  run-time adjustment: {look.get('looks', 0)} looks, "
                   f"{look.get('switches', 0)} switches; last: {look.get('note', '')}")  # fmt: skip
    stats = st.get("stats") or {}
    if stats.get("preemptions") or stats.get("tasks_lost"):
        out.append(f"  preemptions {stats.get('preemptions', 0)}, workers lost "
                   f"{stats.get('tasks_lost', 0)}, prefix tokens recomputed "
                   f"{stats.get('prefix_tokens', 0)}, "
                   f"tokens lost {stats.get('lost_tokens', 0)}")  # fmt: skip
    return out
