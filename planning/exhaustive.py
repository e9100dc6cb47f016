"""Exhaustive stage search for tiny instances: the optimum the greedy search approximates.

Tries every candidate stage at every event (the greedy search's candidate set without its
idle-GPU filter or its candidate cap, re-plans included) and keeps the plan with the smallest
replayed makespan under the given draw. Exponential: for checks on a few units and GPUs only.
"""

from __future__ import annotations

import math

from planning.plan import Plan
from planning.replay import PlanContext, ReplayState
from planning.stage_search import (
    SearchConfig,
    StageSearch,
    UnitTable,
    _all_finished,
    _next_event,
)
from planning.workload import Draw

MAX_LEAVES = 200_000  # complete plans tried at most


def exhaustive_plan(
    ctx: PlanContext, draw: Draw, tables: list[UnitTable], budget: int | None
) -> tuple[Plan, float, int]:
    """(best plan, its makespan in s, complete plans tried).

    Raises:
        RuntimeError: the instance has more than ``MAX_LEAVES`` complete plans.
    """
    cfg = SearchConfig(lookahead=1, idle_filter=False, max_candidates=10**9)
    search = StageSearch(ctx, draw, tables, cfg, budget=budget)
    best: list[tuple[float, ReplayState | None]] = [(math.inf, None)]
    leaves = [0]

    def walk(state: ReplayState, t: float, stage: int) -> None:
        if _all_finished(state):
            leaves[0] += 1
            if leaves[0] > MAX_LEAVES:
                raise RuntimeError(f"exhaustive search: more than {MAX_LEAVES} plans")
            if state.makespan() < best[0][0]:
                best[0] = (state.makespan(), state)
            return
        cands = [c for _, c in search._candidates(state, t) if search._place(state, c, t)]
        if not cands:
            cands = [[]]
        for combo in cands:
            trial = state.clone()
            for a in search._assignments(trial, combo, stage, t) if combo else []:
                trial.apply(a)
            nxt = _next_event(trial, t)
            if nxt is None and not _all_finished(trial):
                continue
            walk(trial, t if nxt is None else nxt, stage + 1 if combo else stage)

    walk(ReplayState(ctx, draw, budget), 0.0, 0)
    ms, state = best[0]
    if state is None:
        raise RuntimeError("exhaustive search found no complete plan")
    return Plan("exhaustive", tuple(state.assignments)), ms, leaves[0]
