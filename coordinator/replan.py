"""Re-planning once a router's routes are known (no I/O; :class:`coordinator.runner.JobRun`
decides when and stores the result).

A route decided by a router LLM is planned with the ``estimate`` shares (apps/expand.py). When
every router request has committed or failed, the real split is known. If at that moment none of
the units yet to run has launched and no other work is running (the job is between stages), the
coordinator plans the rest afresh: the graph of the units not launched, holding only their open
requests (router candidates not chosen are gone; outputs already committed become fixed prompt
tokens), on the whole cluster, starting now. Its assignments are appended to the plan, the old
assignments of those units are dropped (kept in the list as launched and skipped, so every plan
index the ledger refers to stays valid), and the job's estimate becomes the re-plan's, shifted
by the time elapsed. Otherwise the plan made from the estimate runs on (the reason is recorded);
re-planning the rest while other work runs is run-time adjustment's job.

The outcome is one JSON document (:func:`apply_replan` rebuilds the job from it after a
coordinator restart, without planning again).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from coordinator.job import JobModel
from planning.cluster import GpuGroup
from planning.graph import AppGraph, Dep, LlmCall
from planning.plan import Assignment, Plan, Timeline, assignment_to_dict
from planning.planner import PlanEstimate, PlannerConfig, plan_app


class ReplanSkip(Exception):
    """Why the rest of the job is not re-planned (the current plan runs on)."""


def remaining_graph(
    job: JobModel, closed: Mapping[str, int | None], launched_units: Collection[int],
    prefix: Mapping[str, int] | None = None,
) -> tuple[AppGraph, list[int]]:  # fmt: skip
    """The calls of the units not launched, with their open requests only, and per call of it
    the job unit it belongs to. ``closed``: key -> output tokens (committed), or None (failed,
    or a router candidate not chosen). ``prefix``: key -> tokens a request has generated so
    far (a mid-run re-plan draws its length given that).

    Raises:
        ReplanSkip: a remaining request consumes an output that is neither committed nor gone.
    """
    runs = job.loaded.runs
    unit_of = {c: u for u, unit in enumerate(job.units) for c in unit.calls}
    left = [c for c in range(len(runs.calls)) if unit_of[c] not in launched_units]
    new_index: dict[int, int] = {}
    kept: dict[int, list[int]] = {}
    calls: list[LlmCall] = []
    for c in left:
        call = runs.calls[c]
        rows = [r for r in range(call.num_requests) if _key(call, r) not in closed]
        if not rows:
            continue
        kept[c] = rows
        new_index[c] = len(calls)
        sub = _sub_call(runs, call, rows, kept, new_index, closed)
        if prefix:
            gen = [min(prefix.get(_key(call, r), 0), int(call.max_tokens[r]) - 1) for r in rows]
            sub = replace(sub, generated=np.array(gen, dtype=np.int64))
        calls.append(sub)
    if not calls:
        raise ReplanSkip("nothing is left to plan")
    owners = [unit_of[c] for c in sorted(new_index, key=new_index.__getitem__)]
    return AppGraph(tuple(calls), runs.models, runs.name), owners


def _key(call: LlmCall, r: int) -> str:
    return f"{call.name}/{call.request_ids[r] if call.request_ids else r}"


def _sub_call(
    runs: AppGraph, call: LlmCall, rows: list[int], kept: dict[int, list[int]],
    new_index: dict[int, int], closed: Mapping[str, int | None],
) -> LlmCall:  # fmt: skip
    base = call.base_prompt_len[rows].copy()
    deps: list[Dep] = []
    for d in call.deps:
        up = runs.calls[d.call]
        local = {r: i for i, r in enumerate(kept.get(d.call, ()))}
        src = np.full(len(rows), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            s = int(d.src[r])
            if s < 0:
                continue
            if s in local:
                src[i] = local[s]
            elif (key := _key(up, s)) in closed:
                base[i] += closed[key] or 0
            else:
                raise ReplanSkip(f"input {key} of {_key(call, r)} is still being produced")
        if (src >= 0).any():
            deps.append(Dep(new_index[d.call], src))
    ids = tuple(call.request_ids[r] for r in rows) if call.request_ids else ()
    return LlmCall(call.name, call.model, base, call.max_tokens[rows], tuple(deps), ids)


def replan(
    job: JobModel, closed: Mapping[str, int | None], launched: Collection[int], t_now: float,
    config: PlannerConfig,
) -> dict[str, Any]:  # fmt: skip
    """Plan the units not launched from ``t_now`` (engine s since the job started); the
    document :func:`apply_replan` applies.

    Raises:
        ReplanSkip: the rest cannot be re-planned alone (the reason says why).
    """
    if job.plan.method != "samullm":
        raise ReplanSkip(f"the job runs the {job.plan.method} baseline, which does not re-plan")
    launched_units = {job.plan.assignments[k].unit for k in launched}
    graph, owners = remaining_graph(job, closed, launched_units)
    est = plan_app(graph, job.cluster, serving=job.serving, config=config).searched
    unit_map = _unit_map(est, owners)
    dropped = [k for k in range(len(job.plan.assignments)) if k not in launched]
    stage0 = job.plan.num_stages
    tl = est.timeline
    return {
        "at_s": t_now,
        "dropped": dropped,
        "assignments": [
            {**assignment_to_dict(a), "unit": unit_map[a.unit], "stage": stage0 + a.stage}
            for a in est.plan.assignments
        ],
        "start": list(tl.start), "ready": list(tl.ready), "end": list(tl.end),
        "makespans": list(est.makespans),
    }  # fmt: skip


def _unit_map(est: PlanEstimate, owners: list[int]) -> dict[int, int]:
    """Re-plan unit -> job unit; each job unit must be one re-plan unit."""
    out: dict[int, int] = {}
    for i, unit in enumerate(est.ctx.units):
        mine = {owners[c] for c in unit.calls}
        if len(mine) != 1:
            raise ReplanSkip(f"unit {unit.name} of the re-plan spans several units of the job")
        out[i] = mine.pop()
    if len(set(out.values())) != len(out):
        raise ReplanSkip("a unit of the job would be split over several re-plan units")
    return out


def apply_replan(job: JobModel, doc: Mapping[str, Any]) -> JobModel:
    """``job`` running the re-planned rest: appended assignments and the shifted estimate."""
    old, t0 = job.estimate, float(doc["at_s"])
    dropped = set(doc["dropped"])
    new = tuple(_assignment(a) for a in doc["assignments"])
    plan = Plan(old.plan.method, old.plan.assignments + new)
    nan = math.nan

    def joined(before: tuple[float, ...], after: list[float]) -> tuple[float, ...]:
        kept = tuple(nan if k in dropped else x for k, x in enumerate(before))
        return kept + tuple(t0 + x for x in after)

    tl = old.timeline
    makespans = tuple(t0 + m for m in doc["makespans"])
    timeline = Timeline(
        joined(tl.start, doc["start"]), joined(tl.ready, doc["ready"]),
        joined(tl.end, doc["end"]), tl.unit_finish, float(np.median(makespans)),
    )  # fmt: skip
    est = PlanEstimate(plan, old.ctx, makespans, timeline)
    return replace(job, estimate=est)


def _assignment(d: Mapping[str, Any]) -> Assignment:
    groups = tuple(GpuGroup(g["node"], tuple(g["gpus"])) for g in d["gpu_groups"])
    return Assignment(int(d["unit"]), int(d["tp"]), int(d["dp"]), groups, int(d["stage"]))


def planner_config(job: JobModel) -> PlannerConfig:
    """The planner settings the job was planned with."""
    return PlannerConfig(draws=job.draws, seed=job.seed)
