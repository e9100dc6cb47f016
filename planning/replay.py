"""Replay a plan under one length draw: launch times, request finish times, the makespan.

:class:`ReplayState` applies assignments one at a time with the launch rule of
:mod:`planning.plan` and simulates each engine run with :func:`planning.unit_sim.run_work`. The
stage search uses the same state to build its plan, so the planner's estimate of a plan and the
estimate of a baseline's plan come from one code path.

A run ends when its last request finishes or when the unit's next assignment launches; then the
finished requests are kept and the others continue from the tokens they had generated
(snapshot of the run at that time), recomputing their prefix (method.md §5.1, "cut").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from planning.batching_sim import EngineConfig
from planning.cluster import Cluster, GpuGroup, GpuId
from planning.estimate import ServingConfig, engine_for
from planning.graph import AppGraph
from planning.plan import Assignment, Plan, Timeline
from planning.profile import KNOWN_GPUS, ModelProfile
from planning.unit_sim import UnitRun, Work, run_work
from planning.workload import Draw, Unit

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(slots=True, eq=False)
class PlanContext:
    """Everything fixed while planning one application on one cluster."""

    graph: AppGraph
    units: tuple[Unit, ...]
    cluster: Cluster
    serving: ServingConfig
    # mid-run re-plan: unit -> the run it has now (loaded; continuing it costs no load)
    resident: Mapping[int, Assignment] = field(default_factory=dict)
    # mid-run re-plan: the GPU groups that have a worker (None = any group of the cluster)
    allowed: frozenset[GpuGroup] | None = None
    _engines: dict[tuple[str, int], EngineConfig] = field(default_factory=dict)

    def profile(self, unit: int, tp: int) -> ModelProfile:
        """Profile of the unit's model at ``tp``."""
        return self.graph.models[self.units[unit].model].profiles[tp]

    def engine(self, unit: int, tp: int) -> EngineConfig:
        """Scheduler limits of one replica of the unit's model at ``tp`` (cached)."""
        key = (self.units[unit].model, tp)
        eng = self._engines.get(key)
        if eng is None:
            profile = self.profile(unit, tp)
            eng = engine_for(profile, KNOWN_GPUS[profile.gpu], self.serving)
            self._engines[key] = eng
        return eng

    def continues(self, a: Assignment) -> bool:
        """Whether ``a`` is the run its unit has now (same tp, dp and GPU groups)."""
        now = self.resident.get(a.unit)
        return now is not None and (now.tp, now.dp) == (a.tp, a.dp) and set(
            now.groups
        ) == set(a.groups)

    def tps(self, unit: int) -> tuple[int, ...]:
        """Tensor-parallel degrees the unit's model may use, ascending."""
        return tuple(sorted(self.graph.models[self.units[unit].model].profiles))


@dataclass(slots=True, eq=False)
class _Live:
    """The run a unit has now."""

    assignment: int  # index into ReplayState.assignments
    ready: float  # s; serving starts
    work: Work
    index: IntArray  # unit-local request index of each request of ``work``
    run: UnitRun


class ReplayState:
    """Mutable replay of a plan prefix under one draw (copy with :meth:`clone`)."""

    def __init__(self, ctx: PlanContext, draw: Draw, budget: int | None) -> None:
        self.ctx = ctx
        self.draw = draw
        self.budget = budget
        n = len(ctx.units)
        self.done: list[NDArray[np.bool_]] = [np.zeros(u.num_requests, bool) for u in ctx.units]
        self.finish: list[FloatArray] = [np.full(u.num_requests, math.nan) for u in ctx.units]
        self.gen: list[IntArray] = [g.copy() for g in draw.generated]  # prefix per request
        self.live: list[_Live | None] = [None] * n
        self.first_start: list[float] = [math.nan] * n
        self.unit_finish: list[float] = [math.nan] * n
        self.gpu_free: dict[GpuId, float] = {g: 0.0 for g in ctx.cluster.gpu_ids()}
        self.gpu_owner: dict[GpuId, int] = {}
        self.assignments: list[Assignment] = []
        self.start: list[float] = []
        self.ready: list[float] = []
        self.end: list[float] = []
        self.runs: list[tuple[float, UnitRun, IntArray] | None] = []  # (ready, run, index)

    def clone(self) -> ReplayState:
        """Independent copy (runs and draws are shared; they are never mutated)."""
        other = copy.copy(self)
        other.done = [a.copy() for a in self.done]
        other.finish = [a.copy() for a in self.finish]
        other.gen = [a.copy() for a in self.gen]
        other.live = list(self.live)
        other.first_start = list(self.first_start)
        other.unit_finish = list(self.unit_finish)
        other.gpu_free = dict(self.gpu_free)
        other.gpu_owner = dict(self.gpu_owner)
        other.assignments = list(self.assignments)
        other.start, other.ready, other.end = list(self.start), list(self.ready), list(self.end)
        other.runs = list(self.runs)
        return other

    # ------------------------------------------------------------------ queries
    def finished(self, unit: int) -> bool:
        """Whether every request of ``unit`` is done (as far as the replay knows)."""
        return not math.isnan(self.unit_finish[unit])

    def started(self, unit: int) -> bool:
        """Whether ``unit`` has been launched."""
        return not math.isnan(self.first_start[unit])

    def launch_time(self, a: Assignment) -> float:
        """When ``a`` may launch: its GPUs free and its upstream units started."""
        t = 0.0
        for g in a.gpu_ids():
            owner = self.gpu_owner.get(g)
            if owner is None or self.assignments[owner].unit != a.unit:
                t = max(t, self.gpu_free[g])
        for u in self.ctx.units[a.unit].upstream:
            if not self.started(u):
                raise ValueError(
                    f"unit {self.ctx.units[a.unit].name!r} is launched before its input "
                    f"{self.ctx.units[u].name!r}"
                )
            t = max(t, self.first_start[u])
        return t

    def makespan(self) -> float:
        """The last unit's finish (nan while some unit is unfinished)."""
        return (
            max(self.unit_finish)
            if all(map(self.finished, range(len(self.ctx.units))))
            else math.nan
        )

    # ------------------------------------------------------------------ apply
    def apply(self, a: Assignment) -> None:
        """Launch ``a`` (append it to the replayed plan)."""
        t0 = self.launch_time(a)
        idx = len(self.assignments)
        self.assignments.append(a)
        u = a.unit
        self._stop(u, t0)
        if self.finished(u):
            self.start.append(math.nan)
            self.ready.append(math.nan)
            self.end.append(math.nan)
            self.runs.append(None)
            return
        load = self.ctx.profile(u, a.tp).load_time_s
        if t0 == 0.0 and not self.started(u) and self.ctx.continues(a):
            load = 0.0  # the engine is already up: the run goes on
        work, index = self._work(u, t0 + load)
        run = run_work(
            work, self.ctx.engine(u, a.tp), self.ctx.profile(u, a.tp).step, a.dp, budget=self.budget
        )
        ready = t0 + load
        self.finish[u][index] = ready + run.finish
        end = ready + run.total_s
        self.start.append(t0)
        self.ready.append(ready)
        self.end.append(end)
        self.runs.append((ready, run, index))
        self.live[u] = _Live(idx, ready, work, index, run)
        if math.isnan(self.first_start[u]):
            self.first_start[u] = t0
        for g in a.gpu_ids():
            self.gpu_free[g] = end
            self.gpu_owner[g] = idx
        self.unit_finish[u] = end  # final unless a later assignment replaces this run

    def _stop(self, u: int, t: float) -> None:
        """Cut the live run of ``u`` at ``t`` (a later assignment replaces it)."""
        live = self.live[u]
        if live is None:
            return
        self.live[u] = None
        fin = self.finish[u][live.index]
        done_now = fin <= t
        self.done[u][live.index[done_now]] = True
        if done_now.all():
            self.unit_finish[u] = float(fin.max())
            self.end[live.assignment] = self.unit_finish[u]
            return
        self.unit_finish[u] = math.nan
        self.end[live.assignment] = t
        if t > live.ready:
            gen = live.run.generated_at(t - live.ready, live.work)
            self.gen[u][live.index] = gen
        rest = live.index[~done_now]
        self.finish[u][rest] = math.nan
        a = self.assignments[live.assignment]
        for g in a.gpu_ids():
            if self.gpu_owner.get(g) == live.assignment:
                self.gpu_free[g] = t

    def _work(self, u: int, ready: float) -> tuple[Work, IntArray]:
        unit = self.ctx.units[u]
        index = np.flatnonzero(~self.done[u]).astype(np.int64)
        pos = np.full(unit.num_requests, -1, dtype=np.int64)
        pos[index] = np.arange(index.size)
        after_full = unit.after[index]
        after = np.where(after_full >= 0, pos[np.maximum(after_full, 0)], -1)
        arrival = np.zeros(index.size)
        if unit.ext_unit.shape[1]:
            arrival = self._arrivals(unit, index) - ready
        gen = self.gen[u][index]
        out = self.draw.output[u][index]
        gen = np.minimum(gen, out - 1)
        work = Work(
            prompt=self.draw.prompt[u][index],
            output=out,
            generated=gen,
            arrival=np.maximum(arrival, 0.0),
            after=after,
        )
        return work, index

    def _arrivals(self, unit: Unit, index: IntArray) -> FloatArray:
        """Absolute time each request's cross-unit inputs are all done (0 when none)."""
        eu, er = unit.ext_unit[index], unit.ext_req[index]
        out = np.zeros(index.size)
        for k in range(eu.shape[1]):
            has = eu[:, k] >= 0
            if not has.any():
                continue
            times = np.zeros(index.size)
            for src in np.unique(eu[has, k]).tolist():
                sel = has & (eu[:, k] == src)
                times[sel] = self.finish[src][er[sel, k]]
            if np.isnan(times[has]).any():
                raise ValueError(
                    f"unit {unit.name!r}: an input of {self.ctx.units[int(src)].name!r} has no "
                    "finish time (its producer is not running)"
                )
            out = np.maximum(out, np.where(has, times, 0.0))
        return out

    def timeline(self) -> Timeline:
        """The replayed plan so far."""
        return Timeline(
            start=tuple(self.start),
            ready=tuple(self.ready),
            end=tuple(self.end),
            unit_finish=tuple(self.unit_finish),
            makespan=self.makespan(),
        )


def replay(plan: Plan, ctx: PlanContext, draw: Draw, *, budget: int | None = None) -> Timeline:
    """Replay every assignment of ``plan`` under ``draw``.

    Raises:
        ValueError: a unit launched before its inputs, or a unit the plan never finishes.
    """
    state = ReplayState(ctx, draw, budget)
    for a in plan.assignments:
        state.apply(a)
    tl = state.timeline()
    missing = [ctx.units[u].name for u in range(len(ctx.units)) if not state.finished(u)]
    if missing:
        raise ValueError(f"plan {plan.method!r} never runs units {missing}")
    return tl
