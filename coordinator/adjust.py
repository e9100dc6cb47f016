"""Run-time adjustment: look at the running job, re-plan the rest, switch when it pays.

:class:`Adjuster` belongs to one :class:`coordinator.runner.JobRun`. On every ``advance`` it
decides whether to look (:meth:`Adjuster.due`):

- at once when a worker was lost or some open requests have neither a task nor a planned
  assignment (failure is a signal: their work is re-planned on the groups left);
- when a running model's calibrated latency or length scale moved by more than
  :data:`DRIFT` since the last look (beliefs turned out wrong);
- when a unit finished (GPUs freed), and otherwise every :data:`PERIOD_FRAC` of the planned
  makespan, at most once per :data:`MIN_LOOK_GAP_S` of real time.

A look builds the job's mid-run state (:func:`midrun_state`: open requests with the tokens they
generated, beliefs recalibrated from progress, the runs up now, the assignments not launched,
the groups that have a live worker) and asks :mod:`planning.midrun` for the three candidates on a
look process, so the coordinator's loop goes on launching and committing meanwhile; the next
``advance`` after they are in takes the decision. The current plan's estimate is the job's
live remaining time (P50/P90).

A switch is applied in one MULTI as a re-plan document
(:func:`coordinator.replan.apply_replan`): the assignments not launched are dropped, the new
ones appended, and the running models the new plan stops or moves are preempted; their
unfinished requests go to their new assignment with their generated prefixes (the runtime's
cooperative stop, so nothing is lost or duplicated).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.eta import MIN_EXACT_LENGTHS
from coordinator.messages import WorkerInfo
from coordinator.replan import ReplanSkip, remaining_graph
from planning.cluster import GpuGroup
from planning.graph import AppGraph, ModelInfo
from planning.midrun import AdjustPolicy, Candidate, Decision, MidRun, MidRunError, decide, evaluate
from planning.plan import Assignment, assignment_to_dict
from planning.planner import PlannerConfig

if TYPE_CHECKING:
    from coordinator.runner import JobRun

log = logging.getLogger(__name__)
DRIFT = 0.15  # relative change of a calibrated scale that triggers a look
PERIOD_FRAC = 0.25  # of the planned makespan between periodic looks
MIN_LOOK_GAP_S = 1.0  # real s between two looks
# NOTE(adjust): a look (and the calibration check) waits this many times its own cost before
# the next one, so looks take at most ~1/(1 + LOOK_DUTY) of a CPU core from the workers and the
# checks as much of the coordinator's loop; on a 90,000-request job a look costs seconds.
LOOK_DUTY = 4.0
LOOK_DRAWS = 3  # length draws per look (the decision pairs candidates draw by draw)
LOOK_SEARCH_BUDGET = 500  # requests simulated per run while searching during a look
LOOK_EVAL_BUDGET = 1000  # requests simulated per run for the candidates' estimates


@dataclass(slots=True)
class Adjuster:
    """Looks, switches and their history for one job (see module docstring)."""

    policy: AdjustPolicy = field(default_factory=AdjustPolicy)
    looks: int = 0
    look_s: float = 0.0  # real s spent looking, in all
    switches: int = 0
    last_look_real: float = -math.inf  # unix s
    last_check_real: float = -math.inf  # unix s; the calibrated scales were last compared
    look_gap_s: float = MIN_LOOK_GAP_S  # real s the next look waits after the last one
    check_gap_s: float = MIN_LOOK_GAP_S  # real s between two calibration checks
    orphans_seen: int = 0  # open requests with neither a task nor an assignment, last tick
    last_look_s: float = -math.inf  # engine s since the job started
    last_switch_s: float = -math.inf  # engine s since the job started
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> at last look
    finished_units: int = 0  # units finished at the last look
    alarm: str = ""  # why the next look is due at once (a lost worker)
    history: list[dict[str, Any]] = field(default_factory=list)  # switches made
    last: dict[str, Any] = field(default_factory=dict)  # the last look, for status
    # the look being evaluated: (its result, engine s it was taken at, why, urgent)
    pending: tuple[Future[tuple[list[Candidate], float]], float, str, bool] | None = None
    urgent_whys: set[str] = field(default_factory=set)  # reasons that are a lost worker
    reasons: dict[str, int] = field(default_factory=dict)  # looks per kind of reason

    def due(self, run: JobRun, workers: dict[str, WorkerInfo], t_now: float) -> str:
        """Why a look is due now ("" when none); at most once per MIN_LOOK_GAP_S of real time
        (the length fits it compares are not free)."""
        if time.time() - self.last_look_real < MIN_LOOK_GAP_S:
            return ""
        why = self.alarm
        orphans = _orphans_without_plan(run)
        if not why and orphans and orphans != self.orphans_seen:  # once per new set of them
            why = "requests without a task or a planned assignment"
        self.orphans_seen = orphans
        dead = run.dead_queues(workers)
        plan = run.job.plan.assignments
        if not why and any(g.queue_name in dead for k, a in enumerate(plan)
                           if k not in run.launched for g in a.groups):  # fmt: skip
            why = "a planned group lost its worker"
        if why:
            self.urgent_whys.add(why)
            return self._count("lost worker", why)
        if time.time() - self.last_look_real < self.look_gap_s:
            return ""
        if time.time() - self.last_check_real < self.check_gap_s:
            return ""
        t0 = time.perf_counter()
        scales = calibrated_scales(run)
        self.last_check_real = time.time()
        self.check_gap_s = max(MIN_LOOK_GAP_S, LOOK_DUTY * (time.perf_counter() - t0))
        for m, (lat, length) in scales.items():
            lat0, len0 = self.scales.get(m, (1.0, 1.0))
            if abs(lat / lat0 - 1) > DRIFT or abs(length / len0 - 1) > DRIFT:
                return self._count("drift", f"{m}: calibrated x{lat:.2f} latency, "
                                            f"x{length:.2f} lengths")  # fmt: skip
        if _finished_units(run) > self.finished_units:
            return self._count("model finished", "a model finished")
        if t_now - self.last_look_s >= PERIOD_FRAC * run.job.estimate.p50:
            return self._count("periodic", "periodic")
        return ""

    def _count(self, kind: str, why: str) -> str:
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        return why

    def look(self, run: JobRun, workers: dict[str, WorkerInfo], t_now: float, why: str) -> None:
        """Snapshot the job and evaluate the candidates in the look process; :meth:`poll`
        decides once they are in (the coordinator's loop goes on meanwhile)."""
        t0 = time.perf_counter()
        scales = calibrated_scales(run)
        self.looks += 1
        self.last_look_real, self.last_look_s, self.alarm = time.time(), t_now, ""
        self.scales, self.finished_units = scales, _finished_units(run)
        try:
            state = midrun_state(run, workers, scales)
        except (ReplanSkip, MidRunError, ValueError, KeyError) as e:
            self._record(run, t_now, why, None, f"not re-planned: {e}")
            return
        self.look_s += time.perf_counter() - t0
        future = _executor().submit(_timed_evaluate, state, look_config(run))
        self.pending = (future, t_now, why, why in self.urgent_whys)

    def busy(self) -> bool:
        """Whether a look is being evaluated."""
        return self.pending is not None

    def poll(self, run: JobRun, workers: dict[str, WorkerInfo]) -> bool:
        """Decide on a finished look (switching when it pays); whether the plan changed."""
        if self.pending is None or not self.pending[0].done():
            return False
        future, t_look, why, urgent = self.pending
        self.pending = None
        try:
            cands, spent = future.result()
        except (ReplanSkip, MidRunError, ValueError, KeyError, RuntimeError) as e:
            self._record(run, t_look, why, None, f"not re-planned: {e}")
            return False
        self.look_s += spent
        self.look_gap_s = max(MIN_LOOK_GAP_S, LOOK_DUTY * spent)
        self.last_look_real = time.time()  # the pause runs from the look's end
        d = decide(cands, self.policy, switches=self.switches,
                   since_switch_s=t_look - self.last_switch_s, urgent=urgent)  # fmt: skip
        before = self.switches
        if d.switch:
            self._switch(run, d, t_look, why)
        else:  # the plan runs on without what waits on a lost group (it would never launch)
            run.drop_dead_assignments(workers)
        self._record(run, t_look, why, d, d.reason)
        return self.switches != before

    def _switch(self, run: JobRun, d: Decision, t_now: float, why: str) -> None:
        resident = running_assignments(run)
        rest = _launchable(d.chosen, resident)
        if not rest and not d.chosen.stopped:
            return
        self.switches += 1
        self.last_switch_s = t_now
        doc = switch_doc(run, d.chosen, rest, t_now)
        names = [run.job.units[u].name for u in d.chosen.stopped]
        entry = {"at_s": t_now, "why": why, "chose": d.chosen.name, "gain_s": d.gain_s,
                 "margin_s": d.margin_s, "stopped": names,
                 "reload_s": d.chosen.reload_s, "recompute_tokens": d.chosen.recompute_tokens,
                 "p50_before_s": d.current.p50, "p50_after_s": d.chosen.p50}  # fmt: skip
        self.history.append(entry)
        run.apply_switch(doc, d.chosen.stopped, entry)
        log.info("job %s switched plan at %.0f s (%s): %s", run.job.job_id, t_now, why, d.reason)

    def _record(self, run: JobRun, t_now: float, why: str, d: Decision | None, note: str) -> None:
        self.last = {"at_s": t_now, "why": why, "note": note, "looks": self.looks,
                     "switches": self.switches, "look_s": self.look_s,
                     "reasons": dict(self.reasons)}  # fmt: skip
        if d is not None:
            self.last.update(remaining_p50_s=d.current.p50, remaining_p90_s=d.current.p90,
                             best=d.chosen.name, gain_s=d.gain_s, margin_s=d.margin_s)  # fmt: skip
        run.r.hset(run.k.state, "adjust", json.dumps(_finite(self.last)))
        if d is not None:
            log.info("job %s look %d at %.0f s (%s): P50 left %.0f s, best re-plan %.0f s; %s",
                     run.job.job_id, self.looks, t_now, why, d.current.p50,
                     d.current.p50 - d.gain_s, note)  # fmt: skip
        else:
            log.info("job %s look %d at %.0f s (%s): %s", run.job.job_id, self.looks, t_now,
                     why, note)  # fmt: skip


_EXECUTOR: list[ProcessPoolExecutor] = []


def _executor() -> ProcessPoolExecutor:
    """The one process looks are evaluated in (numpy and the simulator, no Redis).

    NOTE(adjust): a process, not a thread: a look of a 90,000-request job simulates for
    seconds, and on a thread it held the GIL against the coordinator loop, whose every Redis
    round trip then waited for the GIL (ensemble_10k ran 7x over its plan). Forked at the first
    look; the child only runs pure planning code.
    """
    if not _EXECUTOR:
        ctx = multiprocessing.get_context("fork")
        _EXECUTOR.append(ProcessPoolExecutor(max_workers=1, mp_context=ctx))
    return _EXECUTOR[0]


def _timed_evaluate(state: MidRun, config: PlannerConfig) -> tuple[list[Candidate], float]:
    t0 = time.perf_counter()
    return evaluate(state, config), time.perf_counter() - t0


def look_config(run: JobRun) -> PlannerConfig:
    """Planner settings of a look: the job's seed, fewer draws and budgets (it runs often)."""
    draws = min(run.job.draws, LOOK_DRAWS)
    return PlannerConfig(draws=draws, seed=run.job.seed, search_budget=LOOK_SEARCH_BUDGET,
                         eval_budget=LOOK_EVAL_BUDGET)  # fmt: skip


def calibrated_scales(run: JobRun) -> dict[str, tuple[float, float]]:
    """Per model seen running: (latency scale, length stretch) measured so far."""
    seen = run.seen()
    out: dict[str, tuple[float, float]] = {}
    for m in {run.job.model(rec.unit) for rec in run.tasks.values()}:
        fit = run.estimates.length_fit(m, seen)
        stretch = fit.scale if fit.finished >= MIN_EXACT_LENGTHS else 1.0
        out[m] = (run.estimates.latency_scale(m), stretch)
    return out


def midrun_state(
    run: JobRun, workers: dict[str, WorkerInfo], scales: dict[str, tuple[float, float]]
) -> MidRun:
    """The running job as :mod:`planning.midrun` sees it."""
    job = run.job
    closed: dict[str, int | None] = {**dict.fromkeys(run.failed), **run.done}
    closed.update(dict.fromkeys(run.routed))
    prefix = {k: p.generated_tokens for k, p in run.partial.items()}
    for task in run.live.values():
        prefix.update(task.tokens)
    graph, owners = remaining_graph(job, closed, (), prefix)
    graph = AppGraph(graph.calls, _recalibrated(graph, scales), graph.name)
    resident = {u: a for u, a in running_assignments(run).items() if u in set(owners)}
    up = frozenset(live_groups(run, workers))
    # an assignment on a group whose worker is gone will not launch (runner._launch_due)
    pending = tuple(a for k, a in enumerate(job.plan.assignments)
                    if k not in run.launched and set(a.groups) <= up)  # fmt: skip
    return MidRun(graph, tuple(owners), job.cluster, job.serving, resident, pending, up)


def _recalibrated(graph: AppGraph, scales: dict[str, tuple[float, float]]) -> dict[str, ModelInfo]:
    models = dict(graph.models)
    for m, (lat, length) in scales.items():
        if m not in models or (lat, length) == (1.0, 1.0):
            continue
        models[m] = models[m].scaled(length, lat)
    return models


def running_assignments(run: JobRun) -> dict[int, Assignment]:
    """Per unit with live tasks that are not stopping: the run it has now."""
    groups: dict[int, list[GpuGroup]] = {}
    for rec in run.tasks.values():
        if rec.status in ("created", "sent", "running"):
            groups.setdefault(rec.unit, []).append(rec.group)
    out = {}
    for u, gs in groups.items():
        tp = Counter(len(g.gpus) for g in gs).most_common(1)[0][0]
        mine = tuple(sorted({g for g in gs if len(g.gpus) == tp}, key=lambda g: (g.node, g.gpus)))
        out[u] = Assignment(u, tp, len(mine), mine, 0)
    return out


def live_groups(run: JobRun, workers: dict[str, WorkerInfo]) -> list[GpuGroup]:
    """Groups of the job's cluster whose worker beats."""
    dead = run.dead_queues(workers)
    names = {n.name for n in run.job.cluster.nodes}
    return [GpuGroup(w.node, tuple(w.gpus)) for q, w in workers.items()
            if q not in dead and w.node in names]  # fmt: skip


def _launchable(
    chosen: Candidate, resident: dict[int, Assignment]
) -> list[tuple[Assignment, tuple[float, float]]]:
    """The chosen plan's assignments (with their estimated start and end) minus each running
    model's first one when it is the run the model has now (that run goes on)."""
    out, seen = [], set()
    times = chosen.times or ((math.nan, math.nan),) * len(chosen.assignments)
    for a, t in zip(chosen.assignments, times, strict=True):
        now = resident.get(a.unit)
        first = a.unit not in seen
        seen.add(a.unit)
        if first and now is not None and (now.tp, now.dp, set(now.groups)) == (
            a.tp, a.dp, set(a.groups)
        ) and a.unit not in chosen.stopped:  # fmt: skip
            continue
        out.append((a, t))
    return out


def switch_doc(
    run: JobRun, chosen: Candidate, rest: list[tuple[Assignment, tuple[float, float]]],
    t_now: float,
) -> dict[str, Any]:  # fmt: skip
    """The re-plan document :func:`coordinator.replan.apply_replan` applies (times are from
    the look, as the re-plan estimated them)."""
    job = run.job
    stage0 = job.plan.num_stages
    dropped = [k for k in range(len(job.plan.assignments)) if k not in run.launched]
    starts = [t[0] for _, t in rest]
    ends = [t[1] for _, t in rest]
    return {
        "at_s": t_now, "dropped": dropped, "kind": "adjust",
        "assignments": [{**assignment_to_dict(a), "stage": stage0 + a.stage} for a, _ in rest],
        "start": starts, "ready": starts, "end": ends, "makespans": list(chosen.makespans),
    }  # fmt: skip


def _orphans_without_plan(run: JobRun) -> int:
    """Open requests of started units that have neither a live task nor a planned assignment."""
    n = 0
    for u in run.started_units:
        if run.pending_launch(u) or any(t.unit == u and t.live for t in run.tasks.values()):
            continue
        n += len(run.open_keys(u))
    return n


def _finished_units(run: JobRun) -> int:
    job = run.job
    return sum(
        1 for keys in job.unit_keys if all(k in run.done or run.closed(k) for k in keys)
    )


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
