"""Plan the rest of a running job and decide whether switching to the new plan pays (pure).

A :class:`MidRun` is what a running job looks like to the planner: the graph of its open
requests (those neither committed nor failed; each with the tokens it has generated so far, so
its length is drawn from ``L | L > g``, and with the beliefs already recalibrated from progress),
the runs that are up now (``resident``: unit -> assignment) and the assignments of the current
plan not launched yet (``pending``). Units are named by the caller's ids (``owner`` per call),
so the caller never sees the planner's own unit numbering.

:func:`evaluate` estimates three candidates under the same Monte-Carlo draws:

- ``current``: the running models go on and the pending assignments launch as planned (a unit
  with open requests and neither a run nor a pending assignment makes it infeasible: its worker
  was lost and only a re-plan gives it GPUs);
- ``keep``: the running models go on and everything not running is planned afresh (the search
  starts from the running models at time 0 and may grow them onto GPUs that free up);
- ``fresh``: everything left is planned afresh on the GPUs that have workers. A model whose new
  first run is the one it has now continues without reload; any other move reloads it and
  recomputes its requests' generated prefixes, and the simulation charges both.

:func:`decide` switches to the best candidate only when its median gain over ``current`` beats
a margin: an absolute floor, a fraction of the remaining time, and a multiple of the switch cost
(reloads of the models it moves), raised after every switch (hysteresis), with a cool-down
between switches and a minimum share of draws the candidate must win. An infeasible current
plan (a lost worker) switches at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from planning.cluster import Cluster, GpuGroup
from planning.estimate import ServingConfig
from planning.graph import AppGraph
from planning.plan import Assignment
from planning.planner import PlannerConfig
from planning.replay import PlanContext, ReplayState
from planning.stage_search import StageSearch, build_tables
from planning.workload import Draw, Unit, build_units, realise_draws


class MidRunError(ValueError):
    """The running job cannot be expressed as one the planner plans (the reason says why)."""


@dataclass(frozen=True, slots=True)
class MidRun:
    """A running job as the planner sees it (see module docstring)."""

    graph: AppGraph  # open requests only, ``LlmCall.generated`` set, beliefs recalibrated
    owner: tuple[int, ...]  # per call of ``graph``: the caller's unit id
    cluster: Cluster  # GPUs that are up
    serving: ServingConfig
    resident: Mapping[int, Assignment] = field(default_factory=dict)  # caller unit -> its run
    pending: tuple[Assignment, ...] = ()  # current plan, not launched, in order (caller units)
    allowed: frozenset[GpuGroup] | None = None  # groups with a worker (None = any)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to run the rest, estimated."""

    name: str  # "current" | "keep" | "fresh"
    assignments: tuple[Assignment, ...]  # to launch from now on (caller units; runs excluded)
    makespans: tuple[float, ...]  # s from now, one per draw (inf: never finishes)
    stopped: tuple[int, ...]  # caller units whose running model it stops or moves
    reload_s: float  # s; load time of the stopped models' next runs, summed
    recompute_tokens: int  # tokens of generated prefixes the stopped models recompute
    # per assignment: (start, end) s from now under the first draw (nan: it never ran)
    times: tuple[tuple[float, float], ...] = ()

    @property
    def p50(self) -> float:
        """Median remaining time (s)."""
        return _percentile(self.makespans, 50.0)

    @property
    def p90(self) -> float:
        """90th percentile of the remaining time (s)."""
        return _percentile(self.makespans, 90.0)


def _percentile(spans: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile that is inf once its rank reaches an infinite draw
    (``np.percentile`` gives nan there)."""
    a = np.sort(np.asarray(spans, dtype=np.float64))
    pos = (a.size - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    if math.isinf(a[hi]):
        return math.inf
    return float(a[lo] + (a[hi] - a[lo]) * (pos - lo))


@dataclass(frozen=True, slots=True)
class AdjustPolicy:
    """When a re-plan replaces the running plan."""

    min_gain_s: float = 10.0  # s; never switch for less
    min_gain_frac: float = 0.05  # of the current plan's median remaining time
    # the margin is also at least this x the reloads the candidate plans for running models
    # (the simulated gain is already net of them: this guards against an optimistic estimate)
    cost_margin: float = 0.5
    win_share: float = 0.8  # share of paired draws the candidate must win
    cooldown_s: float = 60.0  # s (engine) after a switch before the next one
    hysteresis: float = 1.0  # the margin grows by this factor x switches made


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one look at the running job."""

    switch: bool
    chosen: Candidate  # the candidate to run (``current`` when not switching)
    current: Candidate
    gain_s: float  # s; median remaining of current minus chosen's best (may be negative)
    margin_s: float  # s; what the gain had to beat
    reason: str


def evaluate(state: MidRun, config: PlannerConfig) -> list[Candidate]:
    """The three candidates of the module docstring, under ``config.draws`` shared draws.

    Raises:
        MidRunError: a planner unit would mix calls of several caller units.
    """
    units = build_units(state.graph, fuse=config.fuse)
    to_plan, to_caller = _unit_maps(units, state.owner)
    res = {to_plan[u]: replace(a, unit=to_plan[u]) for u, a in state.resident.items()
           if u in to_plan}  # fmt: skip
    ctx = PlanContext(state.graph, units, state.cluster, state.serving, res, state.allowed)
    draws = realise_draws(state.graph, units, config.seed, config.draws)
    base = ReplayState(ctx, draws[0], config.search_budget)
    for a in sorted(res.values(), key=lambda a: a.unit):
        base.apply(a)
    pending = tuple(replace(a, unit=to_plan[a.unit]) for a in state.pending if a.unit in to_plan)
    tables = build_tables(ctx, draws[0], config.search_budget)
    search = StageSearch(ctx, draws[0], tables, config.search, budget=config.search_budget)
    keep, _ = search.run(start=base)
    fresh, _ = search.run()
    plans = {
        "current": (True, pending),
        "keep": (True, keep.assignments[len(res):]),
        "fresh": (False, fresh.assignments),
    }
    out = []
    for name, (resume, rest) in plans.items():
        runs = [_replay(ctx, d, config.eval_budget, res, rest, resume) for d in draws]
        back = tuple(replace(a, unit=to_caller[a.unit]) for a in rest)
        stopped, reload_s, tokens = _moves(ctx, draws[0], res, rest, resume)
        out.append(Candidate(name, back, tuple(r[0] for r in runs),
                             tuple(sorted(to_caller[u] for u in stopped)), reload_s, tokens,
                             runs[0][1]))  # fmt: skip
    return out


def _unit_maps(units: Sequence[Unit], owner: Sequence[int]) -> tuple[dict[int, int], list[int]]:
    """Caller unit -> planner unit and back; each must be the other's one match."""
    to_caller: list[int] = []
    for u in units:
        mine = {owner[c] for c in u.calls}
        if len(mine) != 1:
            raise MidRunError(f"unit {u.name} of the re-plan spans several units of the job")
        to_caller.append(mine.pop())
    to_plan = {c: i for i, c in enumerate(to_caller)}
    if len(to_plan) != len(to_caller):
        raise MidRunError("a unit of the job would be split over several re-plan units")
    return to_plan, to_caller


def _replay(
    ctx: PlanContext, draw: Draw, budget: int | None, res: Mapping[int, Assignment],
    rest: Sequence[Assignment], resume: bool,
) -> tuple[float, tuple[tuple[float, float], ...]]:  # fmt: skip
    """Makespan from now of the running models (when ``resume``) then ``rest`` (inf when some
    unit never finishes or the order is impossible), and each of ``rest``'s (start, end)."""
    state = ReplayState(ctx, draw, budget)
    nan = (math.nan, math.nan)
    try:
        for a in sorted(res.values(), key=lambda a: a.unit) if resume else ():
            state.apply(a)
        for a in rest:
            state.apply(a)
    except ValueError:
        return math.inf, (nan,) * len(rest)
    first = len(state.assignments) - len(rest)
    times = tuple(zip(state.start[first:], state.end[first:], strict=True))
    span = state.makespan()
    return (span if math.isfinite(span) else math.inf), times


def _moves(
    ctx: PlanContext, draw: Draw, res: Mapping[int, Assignment], rest: Sequence[Assignment],
    resume: bool,
) -> tuple[set[int], float, int]:  # fmt: skip
    """Running units a candidate stops now, the load time of the relaunches it plans for
    running units (s), and the generated tokens the stopped ones recompute.

    When the running models go on (``resume``), nothing stops now; a later assignment of a
    running unit (growing it onto freed GPUs) still reloads it, and that load is counted.
    Otherwise a running unit goes on only when its first new assignment is its run and nothing
    planned before takes one of its GPUs (the replay then launches it at 0 without a load).
    """
    first: dict[int, int] = {}  # unit -> index in ``rest`` of its first assignment
    for k, a in enumerate(rest):
        first.setdefault(a.unit, k)
    if resume:
        reload_s = sum(ctx.profile(u, rest[k].tp).load_time_s for u, k in first.items() if u in res)
        return set(), reload_s, 0

    def goes_on(u: int) -> bool:
        k = first.get(u)
        if k is None or not ctx.continues(rest[k]):
            return False
        mine = set(rest[k].gpu_ids())
        return not any(mine & set(b.gpu_ids()) for b in rest[:k])

    stopped = {u for u in res if not goes_on(u)}
    reload_s = sum(ctx.profile(u, rest[first[u]].tp).load_time_s for u in stopped if u in first)
    tokens = int(sum(int(draw.generated[u].sum()) for u in stopped))
    return stopped, reload_s, tokens


def decide(
    cands: Sequence[Candidate], policy: AdjustPolicy, *, switches: int, since_switch_s: float,
    urgent: bool = False,
) -> Decision:  # fmt: skip
    """Whether to leave ``current`` for the best other candidate (see module docstring).

    ``switches``: switches made so far in this job; ``since_switch_s``: engine seconds since
    the last one (inf when none); ``urgent``: the look follows a lost worker, a change of the
    cluster rather than of beliefs, so neither the cool-down nor the hysteresis applies.
    """
    current = next(c for c in cands if c.name == "current")
    others = [c for c in cands if c.name != "current" and math.isfinite(c.p50)]
    if not others:
        return Decision(False, current, current, 0.0, math.inf, "no re-plan finishes the job")
    best = min(others, key=lambda c: (c.p50, c.p90))
    if not math.isfinite(current.p50):
        return Decision(True, best, current, math.inf, 0.0,
                        "the running plan cannot finish (a unit has no GPUs)")  # fmt: skip
    gain = current.p50 - best.p50
    floor = max(policy.min_gain_s, policy.min_gain_frac * current.p50,
                policy.cost_margin * best.reload_s)  # fmt: skip
    margin = floor * (1.0 + (0.0 if urgent else policy.hysteresis * switches))
    wins = np.mean([b < c for b, c in zip(best.makespans, current.makespans, strict=True)])
    if since_switch_s < policy.cooldown_s and not urgent:
        why = f"cooling down ({since_switch_s:.0f} s since the last switch)"
        return Decision(False, current, current, gain, margin, why)
    if gain <= margin:
        return Decision(False, current, current, gain, margin,
                        f"gain {gain:.0f} s does not beat the margin {margin:.0f} s")  # fmt: skip
    if wins < policy.win_share:
        return Decision(False, current, current, gain, margin,
                        f"{best.name} wins only {wins:.0%} of the draws")  # fmt: skip
    return Decision(True, best, current, gain, margin,
                    f"{best.name} saves {gain:.0f} s (margin {margin:.0f} s)")  # fmt: skip
