"""Baseline plans (method.md §8) and the lower bound, built with the planner's own replay.

- ``sequential``: each unit alone, in topological order, with its fastest (tp, dp) (all GPUs).
- ``naive``: SamuLLM's ``naive``: no vertical fusion; each unit keeps its own best plan
  (fastest, load included, inputs assumed ready); stages are formed by the stage search
  without the idle-GPU filter, re-planning or rollouts.
- ``muxserve``: MuxServe-style greedy: at each event, the largest runnable models first, each
  with its most GPU-efficient plan (least GPU-seconds) that fits the free GPUs.
- ``static``: all runnable units at once, the free GPUs split in proportion to their work.

Lower bound: max(critical path of fastest unit times, total best-case GPU-seconds / GPUs).
"""

from __future__ import annotations

from collections.abc import Callable

from planning.cluster import place_groups
from planning.plan import Assignment, Plan
from planning.replay import PlanContext, ReplayState
from planning.stage_search import (
    PlanOption,
    SearchConfig,
    StageSearch,
    UnitTable,
    _free_gpus,
    _next_event,
)
from planning.workload import Draw

Policy = Callable[[ReplayState, list[int], int], list[tuple[int, PlanOption]]]


def sequential(ctx: PlanContext, draw: Draw, tables: list[UnitTable], budget: int | None) -> Plan:
    """Each unit alone on the cluster with its fastest plan, one after another."""
    state = ReplayState(ctx, draw, budget)
    for u, table in enumerate(tables):
        opt = min(table.options, key=lambda o: o.est_s + o.load_s)
        groups = place_groups(ctx.cluster, [opt.tp] * opt.dp)
        if groups is None:
            raise RuntimeError(f"unit {ctx.units[u].name!r}: its best plan does not fit")
        a = Assignment(u, opt.tp, opt.dp, tuple(groups), u)
        state.apply(a)
        _serialise(state)
    return Plan("sequential", tuple(state.assignments))


def _serialise(state: ReplayState) -> None:
    """Hold every GPU until this assignment ends, so the next unit runs alone."""
    end = state.end[-1]
    if end == end:
        for g in state.gpu_free:
            state.gpu_free[g] = max(state.gpu_free[g], end)


def naive(ctx: PlanContext, draw: Draw, tables: list[UnitTable], budget: int | None) -> Plan:
    """Own-best plan per (unfused) unit, then stages by the search without its extras."""
    own = {u: [min(t.options, key=lambda o: o.est_s + o.load_s)] for u, t in enumerate(tables)}
    cfg = SearchConfig(lookahead=1, replan=False, idle_filter=False)
    plan, _ = StageSearch(ctx, draw, tables, cfg, budget=budget, options=own).run("naive")
    return plan


def _muxserve_policy(ctx: PlanContext, tables: list[UnitTable]) -> Policy:
    def size(u: int) -> float:
        p = ctx.profile(u, min(ctx.tps(u)))
        return float(p.weight_bytes_per_gpu * p.tp)

    def policy(state: ReplayState, ready: list[int], free: int) -> list[tuple[int, PlanOption]]:
        out: list[tuple[int, PlanOption]] = []
        for u in sorted(ready, key=lambda v: -size(v)):
            fits = [o for o in tables[u].options if o.gpus <= free]
            if fits:
                o = min(fits, key=lambda x: (x.gpus * x.est_s, -x.gpus))
                out.append((u, o))
                free -= o.gpus
        return out

    return policy


def _static_policy(tables: list[UnitTable]) -> Policy:
    def policy(state: ReplayState, ready: list[int], free: int) -> list[tuple[int, PlanOption]]:
        units = sorted(ready, key=lambda v: -tables[v].work)
        while units:
            total = sum(tables[v].work for v in units)
            picks = []
            for v in units:
                share = free * tables[v].work / total
                fits = [o for o in tables[v].options if o.gpus <= max(share, 1)]
                fits = fits or [min(tables[v].options, key=lambda o: o.gpus)]
                picks.append((v, max(fits, key=lambda o: o.gpus)))
            if sum(o.gpus for _, o in picks) <= free:
                return _spread(picks, free, tables)
            units = units[:-1]
        return []

    return policy


def _spread(
    picks: list[tuple[int, PlanOption]], free: int, tables: list[UnitTable]
) -> list[tuple[int, PlanOption]]:
    """Give GPUs left over by rounding to the units with the most work per GPU."""
    left = free - sum(o.gpus for _, o in picks)
    out = list(picks)
    for i in sorted(range(len(out)), key=lambda k: -tables[out[k][0]].work / out[k][1].gpus):
        u, o = out[i]
        bigger = [x for x in tables[u].options if o.gpus < x.gpus <= o.gpus + left]
        if bigger:
            b = max(bigger, key=lambda x: x.gpus)
            left -= b.gpus - o.gpus
            out[i] = (u, b)
    return out


def list_schedule(
    ctx: PlanContext, draw: Draw, budget: int | None, policy: Policy, method: str
) -> Plan:
    """At each event, launch what ``policy`` picks among runnable units on the free GPUs."""
    state = ReplayState(ctx, draw, budget)
    t, stage = 0.0, 0
    while not all(state.finished(u) for u in range(len(ctx.units))):
        free = _free_gpus(state, t)
        ready = [
            u
            for u in range(len(ctx.units))
            if not state.started(u) and all(state.started(v) for v in ctx.units[u].upstream)
        ]
        picks = policy(state, ready, len(free)) if ready and free else []
        taken = frozenset(g for g in state.gpu_free if g not in set(free))
        groups = place_groups(
            ctx.cluster, [o.tp for _, o in picks for _ in range(o.dp)], taken=taken
        )
        if picks and groups is not None:
            k = 0
            for u, o in picks:
                state.apply(Assignment(u, o.tp, o.dp, tuple(groups[k : k + o.dp]), stage))
                k += o.dp
            stage += 1
        nxt = _next_event(state, t)
        if nxt is None:
            if not picks:
                raise RuntimeError(f"{method}: nothing runs and nothing can start")
            continue
        t = nxt
    return Plan(method, tuple(state.assignments))


def muxserve(ctx: PlanContext, draw: Draw, tables: list[UnitTable], budget: int | None) -> Plan:
    """MuxServe-style greedy (largest model first, most efficient plan that fits)."""
    return list_schedule(ctx, draw, budget, _muxserve_policy(ctx, tables), "muxserve")


def static(ctx: PlanContext, draw: Draw, tables: list[UnitTable], budget: int | None) -> Plan:
    """All runnable units at once, GPUs in proportion to their work."""
    return list_schedule(ctx, draw, budget, _static_policy(tables), "static")


def lower_bound(ctx: PlanContext, tables: list[UnitTable]) -> float:
    """max(critical path of fastest times, total best-case GPU-seconds / GPUs), seconds."""
    fastest = [min(o.est_s for o in t.options) for t in tables]
    path = [0.0] * len(tables)
    for u, unit in enumerate(ctx.units):
        path[u] = fastest[u] + max((path[v] for v in unit.upstream), default=0.0)
    work = sum(t.work for t in tables) / ctx.cluster.num_gpus
    return max(max(path), work)


BASELINES: dict[str, Callable[[PlanContext, Draw, list[UnitTable], int | None], Plan]] = {
    "sequential": sequential,
    "naive": naive,
    "muxserve": muxserve,
    "static": static,
}
