"""The planner's entry point: search a plan, build the baselines, estimate them all under draws.

:func:`plan_app` samples ``draws`` realisations of every output length (seeded), searches a plan
with the greedy stage search on the first draw (scaled simulations, ``search_budget``), and
replays the chosen plan under every draw at ``eval_budget`` to report P50/P90 makespans. With
``compare`` it also builds every baseline (method.md §8) on the first draw and estimates each
under the same draws; the lower bound is always reported. The returned plan is the best
estimated one: the searched plan, or a baseline's plan when that is better under the same draws
(the search treats the heuristics as extra candidates; ``chosen_from`` says which). ``only``
builds one baseline's plan and no search (a baseline job).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from planning.baselines import BASELINES, lower_bound
from planning.cluster import Cluster
from planning.estimate import ServingConfig
from planning.graph import AppGraph
from planning.plan import Plan, Timeline
from planning.replay import PlanContext, replay
from planning.stage_search import SearchConfig, StageSearch, UnitTable, build_tables
from planning.workload import Draw, build_units, realise_draws

DEFAULT_DRAWS = 5  # Monte-Carlo length draws for P50/P90
DEFAULT_SEARCH_BUDGET = 1000  # requests simulated per run while searching (scaled beyond)
DEFAULT_EVAL_BUDGET = 2000  # requests simulated per run for the reported estimates


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Knobs of :func:`plan_app`."""

    draws: int = DEFAULT_DRAWS
    seed: int = 0
    search_budget: int | None = DEFAULT_SEARCH_BUDGET  # None = exact simulation
    eval_budget: int | None = DEFAULT_EVAL_BUDGET  # None = exact simulation
    search: SearchConfig = field(default_factory=SearchConfig)
    fuse: bool = True  # vertical fusion of same-model chains


@dataclass(frozen=True, slots=True)
class PlanEstimate:
    """A plan and its makespan over the draws."""

    plan: Plan
    ctx: PlanContext
    makespans: tuple[float, ...]  # s, one per draw
    timeline: Timeline  # replay under the first draw

    @property
    def p50(self) -> float:
        """Median makespan over draws (s)."""
        return float(np.percentile(self.makespans, 50))

    @property
    def p90(self) -> float:
        """90th percentile makespan over draws (s)."""
        return float(np.percentile(self.makespans, 90))

    @property
    def mean(self) -> float:
        """Mean makespan over draws (s)."""
        return float(np.mean(self.makespans))


@dataclass(frozen=True, slots=True)
class PlanReport:
    """What :func:`plan_app` found."""

    best: PlanEstimate  # the plan to run
    chosen_from: str  # "samullm" (the search) or the baseline whose plan was better
    searched: PlanEstimate  # the search's own plan
    baselines: dict[str, PlanEstimate]  # name -> estimate (empty without compare)
    lower_bound: float | None  # s, under the first draw


def _estimate(
    plan: Plan, ctx: PlanContext, draws: tuple[Draw, ...], budget: int | None
) -> PlanEstimate:
    lines = [replay(plan, ctx, d, budget=budget) for d in draws]
    return PlanEstimate(plan, ctx, tuple(tl.makespan for tl in lines), lines[0])


def plan_app(
    graph: AppGraph,
    cluster: Cluster,
    *,
    serving: ServingConfig | None = None,
    config: PlannerConfig | None = None,
    compare: bool = False,
    only: str | None = None,
) -> PlanReport:
    """Search a plan for ``graph`` on ``cluster`` and estimate it (see module docstring);
    ``only``: build just that baseline's plan instead (``best``, ``searched`` and ``chosen_from``
    are then that baseline's).

    Raises:
        KeyError: ``only`` names no baseline.
    """
    if only is not None and only not in BASELINES:
        raise KeyError(f"no baseline {only!r}; known: {', '.join(BASELINES)}")
    cfg = config or PlannerConfig()
    serv = serving or ServingConfig()
    units = build_units(graph, fuse=cfg.fuse)
    ctx = PlanContext(graph, units, cluster, serv)
    draws = realise_draws(graph, units, cfg.seed, cfg.draws)
    tables = build_tables(ctx, draws[0], cfg.search_budget)
    bound = lower_bound(ctx, tables)
    if only is not None:  # one baseline's plan, no search
        (est,) = _baselines(graph, ctx, draws, tables, cfg, (only,)).values()
        return PlanReport(est, only, est, {only: est}, bound)
    plan, _ = StageSearch(ctx, draws[0], tables, cfg.search, budget=cfg.search_budget).run()
    searched = _estimate(plan, ctx, draws, cfg.eval_budget)
    if not compare:
        return PlanReport(searched, "samullm", searched, {}, bound)
    found = _baselines(graph, ctx, draws, tables, cfg)
    best, chosen = searched, "samullm"
    for name, est in found.items():
        if est.mean < best.mean - 1e-9:
            best, chosen = est, name
    return PlanReport(best, chosen, searched, found, bound)


def _baselines(
    graph: AppGraph,
    ctx: PlanContext,
    draws: tuple[Draw, ...],
    tables: list[UnitTable],
    cfg: PlannerConfig,
    names: Collection[str] | None = None,
) -> dict[str, PlanEstimate]:
    flat_units = build_units(graph, fuse=False)
    flat = PlanContext(graph, flat_units, ctx.cluster, ctx.serving)
    flat_draws = realise_draws(graph, flat_units, cfg.seed, cfg.draws)
    flat_tables = None
    out: dict[str, PlanEstimate] = {}
    for name, build in BASELINES.items():
        if names is not None and name not in names:
            continue
        if name == "naive":
            if flat_tables is None:
                flat_tables = build_tables(flat, flat_draws[0], cfg.search_budget)
            plan = build(flat, flat_draws[0], flat_tables, cfg.search_budget)
            out[name] = _estimate(plan, flat, flat_draws, cfg.eval_budget)
        else:
            plan = build(ctx, draws[0], tables, cfg.search_budget)
            out[name] = _estimate(plan, ctx, draws, cfg.eval_budget)
    return out
