"""Gantt charts of a job: the plan's spans against the spans its tasks really ran.

:func:`job_spans` reads a finished (or running) job through its :class:`coordinator.client.Job`:
the planned spans come from the plan document (each assignment on each of its GPUs, from its
planned start to end), the actual ones from the task records (sent to ended, converted to the
job's clock in simulated seconds), a task that was told to stop marked as preempted.
:func:`draw` puts both on one PNG: one row per GPU, one colour per model, preempted tasks
ending in a cross. matplotlib is imported only there (the ``plots`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Span:
    """One model on one GPU for a while."""

    gpu: str  # "node:index"
    model: str  # Hugging Face id
    unit: str  # unit name
    start_s: float  # s since the job started (simulated s on sim workers)
    end_s: float  # s since the job started
    preempted: bool = False  # the task was told to stop before its work was done


def planned_spans(plan: dict[str, Any]) -> list[Span]:
    """Per assignment and GPU of the plan document: its planned span (skipped ones left out)."""
    out = []
    for a in plan.get("assignments", []):
        start, end = a.get("start_s"), a.get("end_s")
        if start is None or end is None or not (math.isfinite(start) and math.isfinite(end)):
            continue
        for g in a["gpu_groups"]:
            for i in g["gpus"]:
                out.append(Span(f"{g['node']}:{i}", a["model"], a["unit_name"], start, end))
    return out


def actual_spans(
    tasks: list[dict[str, Any]], units: dict[int, tuple[str, str]], started_at: float,
    time_scale: float, preempted: set[str],
) -> list[Span]:  # fmt: skip
    """Per task record and GPU: sent to ended, in seconds since the job started / time scale.
    ``units``: unit index -> (name, model); a task not ended yet is drawn as a point."""
    out = []
    for t in tasks:
        if not t.get("sent_at"):
            continue
        name, model = units.get(t["unit"], (str(t["unit"]), "?"))
        s0 = (max(t["sent_at"], started_at) - started_at) / time_scale
        s1 = ((t["ended_at"] or t["sent_at"]) - started_at) / time_scale
        for i in t["gpus"]:
            out.append(Span(f"{t['node']}:{i}", model, name, s0, max(s1, s0),
                            t["task_id"] in preempted))  # fmt: skip
    return out


def job_spans(job: Any) -> tuple[list[Span], list[Span]]:
    """(planned, actual) spans of ``job`` (a :class:`coordinator.client.Job`)."""
    st = job.status()
    plan = job.plan() or {"assignments": []}
    units = {int(a["unit"]): (a["unit_name"], a["model"]) for a in plan["assignments"]}
    started = float(st.get("started_at") or 0.0)
    scale = float(st.get("time_scale") or 1.0)
    tasks = job.tasks()
    return planned_spans(plan), actual_spans(tasks, units, started, scale, job.preempted(tasks))


def draw(planned: list[Span], actual: list[Span], path: str | Path, title: str = "") -> Path:
    """Both charts in one PNG at ``path``; returns it.

    Raises:
        RuntimeError: matplotlib is not installed (``pip install -e '.[plots]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("Gantt charts need matplotlib: pip install -e '.[plots]'") from e
    gpus = sorted({s.gpu for s in planned + actual}, key=_gpu_order)
    models = sorted({s.model for s in planned + actual})
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.2 + 0.45 * len(gpus) * 2), sharex=True)
    for ax, spans, name in ((axes[0], planned, "planned"), (axes[1], actual, "actual")):
        for s in spans:
            y = gpus.index(s.gpu)
            ax.barh(y, s.end_s - s.start_s, left=s.start_s, height=0.7, color=colour[s.model],
                    edgecolor="black", linewidth=0.4)  # fmt: skip
            if s.preempted:
                ax.plot(s.end_s, y, marker="x", color="black", markersize=8)
        ax.set_yticks(range(len(gpus)), gpus)
        ax.invert_yaxis()
        ax.set_ylabel(f"{name}: GPU")
    axes[1].set_xlabel("seconds since the job started (simulated s on sim workers)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[m]) for m in models]
    fig.legend(handles, models, loc="upper center", ncol=min(len(models), 3), fontsize=8)
    if title:
        axes[0].set_title(title + "  (x: preempted)", fontsize=9, pad=28)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _gpu_order(gpu: str) -> tuple[str, int]:
    node, _, idx = gpu.rpartition(":")
    return node, int(idx)
