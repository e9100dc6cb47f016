"""Greedy stage search (method.md §5) over a replayed timeline.

At each event (start, or a unit finishing) the search looks at the free GPUs and chooses a
*stage*: new units to launch (each with a (tp, dp) and GPU groups) and running units to grow
onto freed GPUs (a re-plan: reload, keep finished outputs, continue the rest). Candidates are
scored like SamuLLM's stages: useful work done until the stage's first finish, divided by that
time, load included. Useful work is measured in best-case GPU-seconds (a request's tokens times
its model's GPU-seconds per token at its most efficient plan), so models of different sizes
compare fairly. The top candidates can be checked by rolling the greedy search out to the end
(``lookahead``), which catches the myopia of a throughput score.

Candidate scoring uses one simulation per (unit, tp) at dp=1 (:class:`UnitTable`), dp replicas
dividing the time (within 1-4% of simulating them, see docs/planner.md); the chosen stage is
then simulated for real in the :class:`~planning.replay.ReplayState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from planning.cluster import GpuGroup, GpuId, place_groups, tp_group_count
from planning.plan import Assignment, Plan
from planning.replay import PlanContext, ReplayState
from planning.unit_sim import Work, run_work
from planning.workload import Draw

FloatArray = NDArray[np.float64]

MAX_CANDIDATES = 3000  # stages scored per event at most (depth-first order, best options first)


@dataclass(frozen=True, slots=True)
class PlanOption:
    """One (tp, dp) of a unit and its estimates from the unit table."""

    tp: int
    dp: int
    est_s: float  # s; serving time of the whole unit alone, load excluded
    load_s: float  # s

    @property
    def gpus(self) -> int:
        """Footprint."""
        return self.tp * self.dp


@dataclass(slots=True, eq=False)
class UnitTable:
    """Per unit: dp=1 simulations at each tp, the options they imply, and the unit's work."""

    times: dict[int, float]  # tp -> s at dp=1
    curve_t: dict[int, FloatArray]  # tp -> sorted finish times at dp=1 (s)
    curve_w: FloatArray  # cumulative work (GPU-s) in finish order
    work: float  # GPU-s; best-case work of the whole unit
    weight: float  # GPU-s per token
    tokens: FloatArray  # per request: prompt + output tokens
    options: list[PlanOption] = field(default_factory=list)  # Pareto by footprint


def build_tables(ctx: PlanContext, draw: Draw, budget: int | None) -> list[UnitTable]:
    """Simulate every unit alone at dp=1 for each tp (inputs treated as ready)."""
    tables = []
    for u, unit in enumerate(ctx.units):
        n = unit.num_requests
        prompt, out = draw.prompt[u], draw.output[u]
        work = Work(prompt, out, np.zeros(n, np.int64), np.zeros(n), unit.after)
        times: dict[int, float] = {}
        curves: dict[int, FloatArray] = {}
        for tp in ctx.tps(u):
            run = run_work(work, ctx.engine(u, tp), ctx.profile(u, tp).step, 1, budget=budget)
            times[tp], curves[tp] = run.total_s, np.sort(run.finish)
        tokens = (prompt + out).astype(np.float64)
        best = min(tp * times[tp] for tp in times)
        weight = best / max(float(tokens.sum()), 1.0)
        curve_w = np.cumsum(np.sort(tokens)) * weight  # finish order ~ size order
        table = UnitTable(times, curves, curve_w, best, weight, tokens)
        table.options = _options(ctx, u, table)
        tables.append(table)
    return tables


def _options(ctx: PlanContext, u: int, table: UnitTable) -> list[PlanOption]:
    """Best (tp, dp) per footprint, keeping only footprints faster than every smaller one."""
    best: dict[int, PlanOption] = {}
    for tp, t1 in table.times.items():
        groups = tp_group_count(ctx.cluster, tp, gpu=ctx.profile(u, tp).gpu)
        load = ctx.profile(u, tp).load_time_s
        for dp in range(1, groups + 1):
            opt = PlanOption(tp, dp, t1 / dp, load)
            cur = best.get(opt.gpus)
            if cur is None or opt.est_s + opt.load_s < cur.est_s + cur.load_s:
                best[opt.gpus] = opt
    out: list[PlanOption] = []
    for g in sorted(best):
        o = best[g]
        if not out or o.est_s + o.load_s < out[-1].est_s + out[-1].load_s:
            out.append(o)
    return out


@dataclass(frozen=True, slots=True)
class _Choice:
    """One unit's part of a candidate stage."""

    unit: int
    option: PlanOption
    grow: bool  # re-plan of a running unit
    extra: int  # free GPUs it takes
    end_rel: float  # s after now; estimated finish
    rate: float  # GPU-s of work per s while serving (linear estimate)


@dataclass(frozen=True, slots=True)
class _Base:
    """Runs that continue through the next stage."""

    ends: dict[int, float]  # unit -> s after now when its live run ends
    rates: dict[int, float]  # unit -> GPU-s of work per s
    gpus: dict[int, int]  # unit -> GPUs its live run holds
    spread: float  # s; all work left divided by the number of GPUs
    waiting: tuple[int, ...]  # units not started yet
    free: int  # GPUs free now


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """Knobs of the search."""

    lookahead: int = 3  # candidates rolled out at each of the first ``lookahead_events``
    lookahead_events: int = 2  # events at which rollouts are used
    replan: bool = True  # allow growing running units onto freed GPUs
    idle_filter: bool = True  # drop stages that leave GPUs idle while a runnable unit waits
    max_candidates: int = MAX_CANDIDATES


class StageSearch:
    """Greedy search producing a :class:`Plan` under one draw."""

    def __init__(
        self,
        ctx: PlanContext,
        draw: Draw,
        tables: list[UnitTable],
        config: SearchConfig,
        *,
        budget: int | None,
        options: dict[int, list[PlanOption]] | None = None,
    ) -> None:
        self.ctx, self.draw, self.tables, self.cfg, self.budget = ctx, draw, tables, config, budget
        self.options = options or {u: t.options for u, t in enumerate(tables)}
        self.down = _downstream_units(ctx)
        # s; each unit's fastest time with load, inputs ready (a unit waiting for GPUs cannot
        # finish earlier than the next stage boundary plus this)
        self._fastest = [
            min(o.load_s + o.est_s for o in self.options[u]) for u in range(len(tables))
        ]

    def run(
        self, method: str = "samullm", *, start: ReplayState | None = None
    ) -> tuple[Plan, ReplayState]:
        """Search from the empty plan (or from ``start``: runs already applied at time 0, a
        mid-run re-plan that keeps them) to a complete one."""
        state = ReplayState(self.ctx, self.draw, self.budget)
        if start is not None:
            state = start.clone()
        state = self._complete(state, 0.0, 0, rollouts=True)
        return Plan(method, tuple(state.assignments)), state

    # -------------------------------------------------------------- driver
    def _complete(self, state: ReplayState, t: float, stage: int, *, rollouts: bool) -> ReplayState:
        events = 0
        # Every unit has a (tentative) finish once launched; keep visiting run ends after that,
        # where growing a straggler onto freed GPUs may still pay.
        while not _all_finished(state) or _next_event(state, t) is not None:
            cands = self._candidates(state, t)
            use_roll = rollouts and events < self.cfg.lookahead_events and self.cfg.lookahead > 1
            chosen = self._pick(state, t, stage, cands, use_roll)
            if chosen:
                for a in self._assignments(state, chosen, stage, t):
                    state.apply(a)
                stage += 1
            events += 1
            nxt = _next_event(state, t)
            if nxt is None:
                if not chosen:
                    raise RuntimeError("stage search is stuck: nothing runs and nothing can start")
                continue
            t = nxt
        return state

    def _pick(
        self,
        state: ReplayState,
        t: float,
        stage: int,
        cands: list[tuple[tuple[float, float], list[_Choice]]],
        rollouts: bool,
    ) -> list[_Choice]:
        feasible: list[list[_Choice]] = []
        limit = self.cfg.lookahead if rollouts else 1
        for _, combo in cands:
            if self._place(state, combo, t) is not None:
                feasible.append(combo)
                if len(feasible) >= limit:
                    break
        if not feasible:
            return []
        if len(feasible) == 1:
            return feasible[0]
        best, best_ms = feasible[0], math.inf
        for combo in feasible:
            trial = state.clone()
            for a in self._assignments(trial, combo, stage, t):
                trial.apply(a)
            nxt = _next_event(trial, t)
            done = self._complete(trial, nxt if nxt is not None else t, stage + 1, rollouts=False)
            ms = done.makespan()
            if ms < best_ms:
                best, best_ms = combo, ms
        return best

    # -------------------------------------------------------------- candidates
    def _candidates(
        self, state: ReplayState, t: float
    ) -> list[tuple[tuple[float, float], list[_Choice]]]:
        free = _free_gpus(state, t)
        choices = self._unit_choices(state, t, len(free))
        if not choices:
            return []
        base = self._continuing(state, t)
        scored: list[tuple[tuple[float, float], list[_Choice]]] = []
        order = sorted(choices, key=lambda u: -self.tables[u].work)
        new_units = [u for u in order if not choices[u][0].grow]
        min_new = {u: min(c.extra for c in choices[u]) for u in new_units}

        def dfs(k: int, left: int, picked: list[_Choice]) -> None:
            if len(scored) >= self.cfg.max_candidates:
                return
            if k == len(order):
                chosen = {c.unit for c in picked}
                if not all(
                    state.started(v) or v in chosen
                    for u in chosen
                    for v in self.ctx.units[u].upstream
                ):
                    return
                if self.cfg.idle_filter and any(
                    min_new[u] <= left
                    for u in new_units
                    if u not in chosen
                    and all(state.started(v) or v in chosen for v in self.ctx.units[u].upstream)
                ):
                    return
                if picked or not new_units:
                    scored.append((self._score(picked, t, base), list(picked)))
                return
            for c in choices[order[k]]:
                if c.extra <= left:
                    picked.append(c)
                    dfs(k + 1, left - c.extra, picked)
                    picked.pop()
            dfs(k + 1, left, picked)

        dfs(0, len(free), [])
        scored.sort(key=lambda x: x[0])
        return scored

    def _unit_choices(self, state: ReplayState, t: float, free: int) -> dict[int, list[_Choice]]:
        out: dict[int, list[_Choice]] = {}
        for u in range(len(self.ctx.units)):
            if _done_by(state, u, t):
                continue
            if not state.started(u):
                # runnable: every input started, or launched in this stage (pipelining)
                if all(state.started(v) or v in out for v in self.ctx.units[u].upstream):
                    cs = [self._new_choice(u, o) for o in self.options[u] if o.gpus <= free]
                    if cs:
                        out[u] = cs
            elif self.cfg.replan and free:
                cs = self._grow_choices(state, u, t, free)
                if cs:
                    out[u] = cs
        return out

    def _new_choice(self, u: int, o: PlanOption) -> _Choice:
        rate = self.tables[u].work / max(o.est_s, 1e-9)
        return _Choice(u, o, False, o.gpus, o.load_s + o.est_s, rate)

    def _remaining_work(self, state: ReplayState, u: int, t: float) -> float:
        """Best-case GPU-s of the requests of ``u`` not finished by ``t``."""
        table = self.tables[u]
        left = ~state.done[u]
        live = state.live[u]
        if live is not None:
            fin = state.finish[u][live.index]
            left = left.copy()
            left[live.index[fin <= t]] = False
        return float(table.tokens[left].sum()) * table.weight

    def _grow_choices(self, state: ReplayState, u: int, t: float, free: int) -> list[_Choice]:
        live = state.live[u]
        if live is None or any(_running(state, d, t) for d in self.down[u]):
            return []
        cur = state.assignments[live.assignment]
        left_s = state.end[live.assignment] - t
        table = self.tables[u]
        remaining = self._remaining_work(state, u, t)
        frac = remaining / max(table.work, 1e-9)
        out = []
        for o in self.options[u]:
            extra = o.gpus - cur.tp * cur.dp
            if extra <= 0 or extra > free:
                continue
            est = o.load_s + frac * o.est_s
            if est < left_s:
                out.append(_Choice(u, o, True, extra, est, remaining / max(frac * o.est_s, 1e-9)))
        return out

    def _continuing(self, state: ReplayState, t: float) -> _Base:
        """End (s after t) and work rate of each live run, and all work left."""
        ends: dict[int, float] = {}
        rates: dict[int, float] = {}
        gpus: dict[int, int] = {}
        left = 0.0
        for u in range(len(self.ctx.units)):
            if _done_by(state, u, t):
                continue
            work = self._remaining_work(state, u, t)
            left += work
            live = state.live[u]
            if live is None or state.end[live.assignment] <= t:
                continue
            end = state.end[live.assignment]
            ends[u] = end - t
            rates[u] = work / max(end - max(t, live.ready), 1e-9)
            a = state.assignments[live.assignment]
            gpus[u] = a.tp * a.dp
        waiting = tuple(u for u in range(len(self.ctx.units)) if not state.started(u))
        free = len(_free_gpus(state, t))
        return _Base(ends, rates, gpus, left / self.ctx.cluster.num_gpus, waiting, free)

    def _fastest_on(self, u: int, gpus: int) -> float:
        """Fastest time (s, load included) of unit ``u`` on at most ``gpus`` GPUs."""
        fits = [o.load_s + o.est_s for o in self.options[u] if o.gpus <= gpus]
        return min(fits) if fits else 2.0 * self._fastest[u]

    def _freed_at(self, picked: list[_Choice], base: _Base, horizon: float) -> int:
        """GPUs released by the runs that end first (at ``horizon``)."""
        grown = {c.unit for c in picked if c.grow}
        freed = sum(
            base.gpus[u] for u, e in base.ends.items() if u not in grown and e <= horizon + 1e-9
        )
        freed += sum(c.option.gpus for c in picked if c.end_rel <= horizon + 1e-9)
        return freed

    def _score(self, picked: list[_Choice], t: float, base: _Base) -> tuple[float, float]:
        """(estimated completion bound, -throughput): smaller is better.

        The bound is max(latest estimated finish among the stage's runs, all work left spread
        over every GPU); candidates within it tie and the SamuLLM throughput score decides.
        """
        grown = {c.unit for c in picked if c.grow}
        ends = [e for u, e in base.ends.items() if u not in grown] + [c.end_rel for c in picked]
        horizon = min(ends, default=math.inf)
        waiting = [u for u in base.waiting if all(c.unit != u for c in picked)]
        later = 0.0
        if waiting and ends:
            avail = base.free - sum(c.extra for c in picked) + self._freed_at(picked, base, horizon)
            queue = sum(self.tables[u].work for u in waiting) / max(avail, 1)
            load = min(self._fastest[u] - min(o.est_s for o in self.options[u]) for u in waiting)
            one = max(self._fastest_on(u, avail) for u in waiting)
            later = horizon + max(one, queue + load)
        bound = max(max(ends, default=0.0), base.spread, later)
        if not math.isfinite(horizon) or horizon <= 0:
            return bound, 0.0
        work = sum(r * horizon for u, r in base.rates.items() if u not in grown)
        for c in picked:
            work += c.rate * max(0.0, horizon - c.option.load_s)
        return bound, -work / horizon

    # -------------------------------------------------------------- placement
    def _place(
        self, state: ReplayState, combo: list[_Choice], t: float
    ) -> list[list[GpuGroup]] | None:
        taken = _held_gpus(state, t, {c.unit for c in combo if c.grow})
        tps = [c.option.tp for c in combo for _ in range(c.option.dp)]
        prefer: list[GpuGroup | None] = []
        for c in combo:  # a model keeps the GPUs it runs on now where it can
            now = self.ctx.resident.get(c.unit)
            mine = list(now.groups) if now is not None and not state.started(c.unit) else []
            prefer += [mine[i] if i < len(mine) else None for i in range(c.option.dp)]
        groups = place_groups(
            self.ctx.cluster, tps, taken=frozenset(taken), prefer=prefer, allowed=self.ctx.allowed
        )
        if groups is None:
            return None
        out, k = [], 0
        for c in combo:
            out.append(groups[k : k + c.option.dp])
            k += c.option.dp
        return out

    def _assignments(
        self, state: ReplayState, combo: list[_Choice], stage: int, t: float
    ) -> list[Assignment]:
        placed = self._place(state, combo, t)
        if placed is None:
            raise RuntimeError("placement vanished between scoring and applying a stage")
        pairs = sorted(zip(combo, placed, strict=True), key=lambda p: (not p[0].grow, p[0].unit))
        return [Assignment(c.unit, c.option.tp, c.option.dp, tuple(g), stage) for c, g in pairs]


# ------------------------------------------------------------------ helpers
def _downstream_units(ctx: PlanContext) -> list[tuple[int, ...]]:
    down: list[set[int]] = [set() for _ in ctx.units]
    for v, unit in enumerate(ctx.units):
        for u in unit.upstream:
            down[u].add(v)
    return [tuple(sorted(d)) for d in down]


def _all_finished(state: ReplayState) -> bool:
    return all(state.finished(u) for u in range(len(state.ctx.units)))


def _done_by(state: ReplayState, u: int, t: float) -> bool:
    """Whether every request of ``u`` has finished by ``t``."""
    return state.finished(u) and state.unit_finish[u] <= t + 1e-9


def _running(state: ReplayState, u: int, t: float) -> bool:
    live = state.live[u]
    return live is not None and state.end[live.assignment] > t


def _free_gpus(state: ReplayState, t: float) -> list[GpuId]:
    return [g for g, free in state.gpu_free.items() if free <= t + 1e-9]


def _held_gpus(state: ReplayState, t: float, except_units: set[int]) -> set[GpuId]:
    return {
        g
        for g, free in state.gpu_free.items()
        if free > t + 1e-9 and state.assignments[state.gpu_owner[g]].unit not in except_units
    }


def _next_event(state: ReplayState, t: float) -> float | None:
    """The earliest run end after ``t`` (None when nothing runs)."""
    ends = [e for e in state.end if e == e and e > t + 1e-9]
    return min(ends, default=None)
