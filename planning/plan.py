"""Plans: ordered stages of (unit, tp, dp, GPU groups) assignments, and their replayed timelines.

A :class:`Plan` is what the planner returns and the runtime executes. Each
:class:`Assignment` starts one engine configuration for one unit (a call, or a fused chain of
calls of one model) on ``dp`` GPU groups of ``tp`` GPUs. A unit may have several assignments:
a later one replaces the earlier (the engine is stopped, finished outputs are kept, unfinished
requests continue on the new engine from their generated prefix).

Launch rule (the same in the planner's replay and in the runtime): an assignment starts when all
of its GPUs are free (GPUs held by the unit's own previous assignment count as free) and every
unit it consumes from has started; requests then arrive as their inputs finish (model-level
pipelining, method.md §5.5). Stages group the assignments decided at one event; their order is
the launch order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planning.cluster import GpuGroup, GpuId


@dataclass(frozen=True, slots=True)
class Assignment:
    """One engine configuration of one unit."""

    unit: int  # index into the planner's units
    tp: int  # GPUs per replica
    dp: int  # replicas
    groups: tuple[GpuGroup, ...]  # one tp group per replica
    stage: int  # index of the stage that launches it

    def __post_init__(self) -> None:
        if len(self.groups) != self.dp or any(len(g.gpus) != self.tp for g in self.groups):
            raise ValueError(f"assignment of unit {self.unit}: needs {self.dp} groups of {self.tp}")

    def gpu_ids(self) -> tuple[GpuId, ...]:
        """Every GPU this assignment holds."""
        return tuple((g.node, i) for g in self.groups for i in g.gpus)


@dataclass(frozen=True, slots=True)
class Plan:
    """Assignments in launch order (stage by stage)."""

    method: str  # "samullm", "sequential", "naive", "muxserve", "static"
    assignments: tuple[Assignment, ...]

    @property
    def num_stages(self) -> int:
        """Stages (1 + the largest stage index; 0 for an empty plan)."""
        return 1 + max((a.stage for a in self.assignments), default=-1)


@dataclass(frozen=True, slots=True)
class Timeline:
    """A plan replayed under one draw; times in seconds from the start of the job."""

    start: tuple[float, ...]  # per assignment: engine launch (load starts); nan = skipped
    ready: tuple[float, ...]  # per assignment: load done, serving starts
    end: tuple[float, ...]  # per assignment: last request done, or replaced by a later one
    unit_finish: tuple[float, ...]  # per unit: its last request done
    makespan: float  # s; the last unit's finish

    def stage_span(self, plan: Plan, stage: int) -> tuple[float, float]:
        """(first launch, first end) of the assignments launched in ``stage``."""
        idx = [i for i, a in enumerate(plan.assignments) if a.stage == stage]
        starts = [self.start[i] for i in idx if self.start[i] == self.start[i]]
        ends = [self.end[i] for i in idx if self.end[i] == self.end[i]]
        return (min(starts, default=float("nan")), min(ends, default=float("nan")))


def assignment_to_dict(a: Assignment) -> dict[str, Any]:
    """Plain JSON-ready form of one assignment (without unit names or times)."""
    return {
        "unit": a.unit,
        "tp": a.tp,
        "dp": a.dp,
        "stage": a.stage,
        "gpu_groups": [
            {"node": g.node, "gpus": list(g.gpus), "queue": g.queue_name} for g in a.groups
        ],
    }
