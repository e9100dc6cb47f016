"""What the coordinator knows of one job that never changes while it runs (no I/O).

:func:`build_job` turns a submission into a :class:`JobModel`: the loaded application, the plan
(searched or a baseline's, per ``options.method``) with its estimate, and per request its ledger
key (``<node>/<request id>``), unit, inputs and sampling. The runtime state (what is committed,
which task owns what) lives in Redis and in :mod:`coordinator.service`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from apps.app_spec import LoadedApp, ModelRuntime, parse_app
from apps.cluster_spec import SpecError, parse_cluster
from coordinator.messages import BeliefScale, EngineSpec, JobSubmission, SamplingParams
from planning.cluster import Cluster, GpuGroup
from planning.estimate import ServingConfig, serving_for
from planning.graph import AppGraph
from planning.io.lengths import load_authors_pdfs
from planning.io.profiles import ProfileError, load_default_profiles, profiles_from_json
from planning.plan import Plan, assignment_to_dict
from planning.planner import PlanEstimate, PlannerConfig, plan_app
from planning.workload import Unit, build_units


@dataclass(frozen=True, slots=True)
class Req:
    """One request of the job."""

    key: str  # "<node>/<request id>"
    node: str
    request_id: str
    unit: int  # index into JobModel.units
    base_tokens: int  # tokens of its own prompt (template included), without inputs
    deps: tuple[str, ...]  # keys whose outputs it consumes
    chain: str  # key of the first request of its same-unit chain (itself when none)
    index: int = 0  # request index in its call (``node`` is the call's name)
    max_tokens: int = 1  # tokens, output cap (the row's own, else the node's)


@dataclass(frozen=True, slots=True, eq=False)
class JobModel:
    """The static part of a running job."""

    job_id: str
    loaded: LoadedApp
    cluster: Cluster
    serving: ServingConfig
    estimate: PlanEstimate  # the plan that runs, with its P50/P90
    units: tuple[Unit, ...]
    reqs: Mapping[str, Req]  # in call order
    unit_keys: tuple[tuple[str, ...], ...]  # per unit, unit-local order
    downstream: Mapping[str, tuple[str, ...]]  # key -> keys consuming it
    sampling: Mapping[str, SamplingParams]  # node -> sampling
    plan_seconds: float  # s spent planning
    lengths_like: Mapping[str, str]  # model -> model whose length pmf the app uses for it
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # router key -> candidates
    draws: int = 5  # length draws the plan was estimated with
    seed: int = 0  # planner seed
    adjust: bool = True  # re-plan the rest at run time (coordinator/adjust.py)
    lower_bound_s: float = 0.0  # s; the planner's lower bound on the makespan (first draw)

    @property
    def plan(self) -> Plan:
        return self.estimate.plan

    def model(self, unit: int) -> str:
        return self.units[unit].model

    def tps(self, unit: int) -> tuple[int, ...]:
        """Tensor-parallel degrees the unit's model may use."""
        return tuple(sorted(self.loaded.graph.models[self.model(unit)].profiles))

    def engine(self, unit: int, tp: int) -> EngineSpec:
        """Engine settings of the unit's model on a group of ``tp`` GPUs.

        The engine loads the model's ``path`` (a local folder or the HF id). On CPU devices the
        KV pool is the planned one (``num_kv_blocks``), so the engine batches as simulated.
        """
        s, model = self.serving, self.model(unit)
        rt = self.loaded.runtime.get(model) or ModelRuntime(model)
        profile = self.loaded.graph.models[model].profiles[tp]
        gpu = self.loaded.profiles.gpu
        blocks = None
        if gpu.name == "CPU":
            blocks = profile.kv_capacity_blocks(
                gpu.memory_bytes, s.gpu_memory_utilization, s.block_size
            )
        return EngineSpec(
            model=model, path=rt.path, tp=tp, max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            max_model_len=min(profile.max_model_len, s.max_model_len or profile.max_model_len),
            gpu_memory_utilization=s.gpu_memory_utilization, block_size=s.block_size,
            num_kv_blocks=blocks, trust_remote_code=rt.trust_remote_code,
            chat_template=rt.chat_template,  # type: ignore[arg-type]
        )  # fmt: skip

    def keep_loaded(self, k: int, group: GpuGroup) -> bool:
        """Whether the next assignment on ``group``'s GPUs after ``k`` reuses its engine."""
        a = self.plan.assignments[k]
        gpus = {(group.node, g) for g in group.gpus}
        for b in self.plan.assignments[k + 1 :]:
            if gpus & set(b.gpu_ids()):
                same_model = self.model(b.unit) == self.model(a.unit) and b.tp == a.tp
                return same_model and group in b.groups
        return False

    def split(self, keys: list[str], dp: int) -> list[list[str]]:
        """``keys`` over ``dp`` replicas: a chain stays on one replica, chains balanced by count."""
        chains: dict[str, list[str]] = {}
        for k in keys:
            chains.setdefault(self.reqs[k].chain, []).append(k)
        parts: list[list[str]] = [[] for _ in range(dp)]
        for members in sorted(chains.values(), key=len, reverse=True):
            min(parts, key=len).extend(members)
        return parts


def build_job(sub: JobSubmission, shared_lengths: Path) -> JobModel:
    """Load and plan a submitted job.

    Raises:
        apps.cluster_spec.SpecError: the application or cluster document is invalid.
    """
    cluster = parse_cluster(sub.cluster, f"{sub.name} (cluster)")
    profiles = load_default_profiles()
    if sub.profiles is not None:
        try:
            profiles = profiles_from_json(json.dumps(sub.profiles), f"{sub.name} (profiles)")
        except ProfileError as e:
            raise SpecError(str(e)) from None
    serving = replace(serving_for(profiles.gpu.name), mode=sub.options.scheduler)
    loaded = parse_app(
        sub.app, sub.name, "/", cluster=cluster, profiles=profiles,
        authors_pdfs=load_authors_pdfs(shared_lengths), serving=serving,
    )  # fmt: skip
    t0 = time.perf_counter()
    opts = sub.options
    if opts.belief:
        loaded = _believed(loaded, opts.belief)
    cfg = PlannerConfig(draws=opts.draws, seed=opts.seed)
    baseline = None if opts.method == "samullm" else opts.method
    # ours runs the best estimated plan: the search's, or a heuristic's when that is better
    # under the same draws (the heuristics are extra candidates of the search)
    report = plan_app(loaded.graph, cluster, serving=serving, config=cfg, only=baseline,
                      compare=baseline is None)  # fmt: skip
    est = report.best
    plan_s = time.perf_counter() - t0
    units = _run_units(loaded, est.ctx.units)
    reqs, unit_keys = _requests(loaded, units)
    downstream: dict[str, list[str]] = {}
    for r in reqs.values():
        for d in r.deps:
            downstream.setdefault(d, []).append(r.key)
    sampling = {
        node: SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                             top_p=s.top_p, ignore_eos=s.ignore_eos)
        for node, s in loaded.sampling.items()
    }  # fmt: skip
    routes = _routes(loaded, reqs)
    return JobModel(
        sub.job_id, loaded, cluster, serving, est, units, reqs, unit_keys,
        {k: tuple(v) for k, v in downstream.items()}, sampling, plan_s, _likes(sub.app), routes,
        opts.draws, opts.seed, opts.adjust and opts.method == "samullm",
        report.lower_bound or 0.0,
    )  # fmt: skip


def _believed(loaded: LoadedApp, belief: Mapping[str, BeliefScale]) -> LoadedApp:
    """``loaded`` with each named model's lengths stretched and profiles scaled."""
    unknown = sorted(set(belief) - set(loaded.graph.models))
    if unknown:
        raise SpecError(f"options.belief: models {unknown} are not in the application")

    def adjusted(graph: AppGraph) -> AppGraph:
        models = dict(graph.models)
        for m, b in belief.items():
            models[m] = models[m].scaled(b.length_scale, b.latency_scale,
                                         f"; belief x{b.length_scale:g} lengths, "
                                         f"x{b.latency_scale:g} latency")  # fmt: skip
        return AppGraph(graph.calls, models, graph.name)

    run_graph = adjusted(loaded.run_graph) if loaded.run_graph is not None else None
    return replace(loaded, graph=adjusted(loaded.graph), run_graph=run_graph)


def _likes(doc: dict[str, object]) -> dict[str, str]:
    """``lengths: like:<model>`` of every model of the application document."""
    out = {}
    for m in doc.get("models") or []:  # type: ignore[attr-defined]
        src = m.get("lengths") if isinstance(m, dict) else None
        if isinstance(src, str) and src.startswith("like:"):
            out[str(m["id"])] = src.removeprefix("like:")
    return out


def _run_units(loaded: LoadedApp, planned: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """The planner's units over the calls that run (a router's candidates are all there)."""
    if loaded.run_graph is None:
        return planned
    names = [u.name for u in planned]
    for fuse in (True, False):
        units = build_units(loaded.runs, fuse=fuse)
        if [u.name for u in units] == names:
            return units
    raise AssertionError(f"units of the run graph differ from the planner's: {names}")


def _routes(loaded: LoadedApp, reqs: Mapping[str, Req]) -> dict[str, tuple[str, ...]]:
    """Router request key -> the candidate keys its output chooses among."""
    out: dict[str, list[str]] = {}
    for key, req in reqs.items():
        cp = loaded.prompts.get(req.node)
        if cp is not None and cp.route is not None:
            for d in req.deps:
                out.setdefault(d, []).append(key)
    return {k: tuple(v) for k, v in out.items()}


def _requests(
    loaded: LoadedApp, units: tuple[Unit, ...]
) -> tuple[dict[str, Req], tuple[tuple[str, ...], ...]]:
    graph = loaded.runs
    keys = [
        [f"{c.name}/{c.request_ids[r] if c.request_ids else r}" for r in range(c.num_requests)]
        for c in graph.calls
    ]
    reqs: dict[str, Req] = {}
    unit_keys = []
    for u, unit in enumerate(units):
        local: list[str] = []
        for ci, c in enumerate(unit.calls):
            call = graph.calls[c]
            for r in range(call.num_requests):
                deps = tuple(keys[d.call][int(d.src[r])] for d in call.deps if d.src[r] >= 0)
                i = unit.offsets[ci] + r
                after = int(unit.after[i])
                chain = reqs[local[after]].chain if after >= 0 else keys[c][r]
                key = keys[c][r]
                rid = call.request_ids[r] if call.request_ids else str(r)
                reqs[key] = Req(key, call.name, rid, u, int(call.base_prompt_len[r]), deps, chain,
                                r, int(call.max_tokens[r]))  # fmt: skip
                local.append(key)
        unit_keys.append(tuple(local))
    order = {k: i for i, k in enumerate(k for ks in keys for k in ks)}
    return dict(sorted(reqs.items(), key=lambda kv: order[kv[0]])), tuple(unit_keys)


def plan_doc(job: JobModel) -> dict[str, Any]:
    """The plan as clients read it (``samullm status``, ``Job.plan()``)."""
    tl = job.estimate.timeline
    rows = [
        {**assignment_to_dict(a), "unit_name": job.units[a.unit].name,
         "model": job.model(a.unit), "start_s": tl.start[i], "end_s": tl.end[i]}
        for i, a in enumerate(job.plan.assignments) if tl.start[i] == tl.start[i]
    ]  # fmt: skip
    return {"method": job.plan.method, "assignments": rows}
