"""Stage planner: valid plans, baselines, lower bound, determinism, greedy vs exhaustive."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from apps.app_spec import load_app
from apps.cluster_spec import load_cluster
from coordinator.settings import load_settings
from planning.baselines import BASELINES, lower_bound
from planning.cluster import Cluster, Node
from planning.estimate import ServingConfig
from planning.exhaustive import exhaustive_plan
from planning.graph import AppGraph, Dep, LlmCall, ModelInfo
from planning.plan import Plan
from planning.planner import PlannerConfig, plan_app
from planning.replay import PlanContext, ReplayState
from planning.stage_search import SearchConfig, StageSearch, build_tables
from planning.unit_sim import Work, run_work
from planning.workload import build_units, realise_draws

ROOT = Path(__file__).resolve().parents[2]
PDFS = load_settings().shared_dir / "data" / "output_length_pdfs.json"
pytestmark = pytest.mark.skipif(not PDFS.exists(), reason="../shared data not present")
PAIRS = Cluster((Node("n0", "A100-80GB", 8, ((0, 1), (2, 3), (4, 5), (6, 7))),))
ONE_ISLAND4 = Cluster((Node("n0", "A100-80GB", 4, ((0, 1, 2, 3),)),))
MODELS = ("lmsys/vicuna-13b-v1.5", "databricks/dolly-v2-12b", "mosaicml/mpt-7b-chat")


def _infos(profiles, pdfs, models, tps=(1, 2)):
    return {m: ModelInfo(m, pdfs[m], {tp: profiles.get(m, tp) for tp in tps}) for m in models}


def _ensemble(profiles, pdfs, n=300, seed=0, tps=(1, 2)):
    rng = np.random.default_rng(seed)
    calls = tuple(
        LlmCall(m.split("/")[1], m, rng.integers(20, 400, n), np.full(n, 256)) for m in MODELS
    )
    return AppGraph(calls, _infos(profiles, pdfs, MODELS, tps))


def _chain(profiles, pdfs, docs=40):
    """Two same-model chain calls (fused), then a judge of another model over each document."""
    rng = np.random.default_rng(3)
    m, j = MODELS[0], MODELS[2]
    c0 = LlmCall("sum.0", m, rng.integers(500, 2000, docs), np.full(docs, 200))
    keep = np.arange(0, docs, 2)
    c1 = LlmCall(
        "sum.1",
        m,
        rng.integers(500, 2000, keep.size),
        np.full(keep.size, 200),
        deps=(Dep(0, keep),),
    )
    src0 = np.where(np.isin(np.arange(docs), keep), -1, np.arange(docs))
    src1 = np.full(docs, -1)
    src1[keep] = np.arange(keep.size)
    judge = LlmCall(
        "judge", j, np.full(docs, 80), np.full(docs, 100), deps=(Dep(0, src0), Dep(1, src1))
    )
    return AppGraph((c0, c1, judge), _infos(profiles, pdfs, (m, j)))


def _replayed(plan: Plan, ctx: PlanContext, draw) -> ReplayState:
    state = ReplayState(ctx, draw, None)
    for a in plan.assignments:
        state.apply(a)
    return state


def assert_valid(plan: Plan, ctx: PlanContext, draw) -> None:
    """GPU exclusivity, NVLink and node rules, dependency order, every request once."""
    state = _replayed(plan, ctx, draw)
    islands = {(n.name, i): isl for n in ctx.cluster.nodes for isl in n.islands for i in isl}
    for a in plan.assignments:
        assert a.tp & (a.tp - 1) == 0 and len(a.groups) == a.dp
        for g in a.groups:
            assert set(g.gpus) <= set(islands[(g.node, g.gpus[0])]), "tp group spans islands"
    held: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for i, a in enumerate(plan.assignments):
        if math.isnan(state.start[i]):
            continue
        for gpu in a.gpu_ids():
            held.setdefault(gpu, []).append((state.start[i], state.end[i], a.unit))
    for spans in held.values():
        spans.sort()
        for (_s0, e0, _), (s1, _, _) in zip(spans, spans[1:], strict=False):
            assert s1 >= e0 - 1e-6, "two runs hold one GPU at once"
    covered = sorted(c for u in ctx.units for c in u.calls)
    assert covered == list(range(len(ctx.graph.calls))), "calls not partitioned into units"
    for u, unit in enumerate(ctx.units):
        fin = state.finish[u]
        assert np.isfinite(fin).all(), f"unit {unit.name}: a request never finished"
        has = unit.after >= 0
        assert (fin[has] >= fin[unit.after[has]] - 1e-6).all()
        for k in range(unit.ext_unit.shape[1]):
            sel = unit.ext_unit[:, k] >= 0
            for r in np.flatnonzero(sel):
                up = state.finish[unit.ext_unit[r, k]][unit.ext_req[r, k]]
                assert fin[r] >= up - 1e-6, "a request finished before its input"


def _ctx(graph, cluster, fuse=True):
    units = build_units(graph, fuse=fuse)
    return PlanContext(graph, units, cluster, ServingConfig())


def test_searched_and_baseline_plans_are_valid(profiles, pdfs):
    for graph in (_ensemble(profiles, pdfs), _chain(profiles, pdfs)):
        for fuse in (True, False):
            ctx = _ctx(graph, PAIRS, fuse)
            draw = realise_draws(graph, ctx.units, 0, 1)[0]
            tables = build_tables(ctx, draw, None)
            plan, _ = StageSearch(ctx, draw, tables, SearchConfig(), budget=None).run()
            assert_valid(plan, ctx, draw)
            for build in BASELINES.values():
                assert_valid(build(ctx, draw, tables, None), ctx, draw)


def test_chain_is_fused_and_pipelined(profiles, pdfs):
    graph = _chain(profiles, pdfs)
    ctx = _ctx(graph, PAIRS)
    assert [u.calls for u in ctx.units] == [(0, 1), (2,)]
    assert (ctx.units[0].after >= 0).sum() == graph.calls[1].num_requests
    draw = realise_draws(graph, ctx.units, 0, 1)[0]
    # a chunk's prompt holds the previous summary
    prompts, outs = draw.prompt[0], draw.output[0]
    n0 = graph.calls[0].num_requests
    src = graph.calls[1].deps[0].src
    assert (prompts[n0:] == graph.calls[1].base_prompt_len + outs[src]).all()


def test_every_request_once_and_dependencies_respected_in_chain(profiles, pdfs):
    graph = _chain(profiles, pdfs)
    report = plan_app(graph, PAIRS, config=PlannerConfig(draws=2), compare=True)
    ctx = report.searched.ctx
    draw = realise_draws(graph, ctx.units, 0, 1)[0]
    assert_valid(report.searched.plan, ctx, draw)
    assert report.lower_bound is not None and report.lower_bound <= report.best.p50


def test_one_baseline_alone_is_the_compared_one(profiles, pdfs):
    """``only=`` (a baseline job) builds just that plan, the same one ``compare`` builds."""
    graph = _ensemble(profiles, pdfs, n=200)
    cfg = PlannerConfig(draws=2)
    full = plan_app(graph, PAIRS, config=cfg, compare=True)
    for name in ("sequential", "static", "naive"):
        one = plan_app(graph, PAIRS, config=cfg, only=name)
        assert one.chosen_from == name and set(one.baselines) == {name}
        assert one.best.plan == full.baselines[name].plan
        assert one.best.p50 == pytest.approx(full.baselines[name].p50)
        assert one.lower_bound == pytest.approx(full.lower_bound)
    with pytest.raises(KeyError, match="no baseline 'greedy'"):
        plan_app(graph, PAIRS, config=cfg, only="greedy")


def test_deterministic_for_a_seed(profiles, pdfs):
    graph = _ensemble(profiles, pdfs, n=200)
    a = plan_app(graph, PAIRS, config=PlannerConfig(draws=3, seed=7))
    b = plan_app(graph, PAIRS, config=PlannerConfig(draws=3, seed=7))
    c = plan_app(graph, PAIRS, config=PlannerConfig(draws=3, seed=8))
    assert a.best.plan == b.best.plan and a.best.makespans == b.best.makespans
    assert a.best.makespans != c.best.makespans


def test_p90_at_least_p50_and_draws_differ(profiles, pdfs):
    rep = plan_app(_ensemble(profiles, pdfs, n=200), PAIRS, config=PlannerConfig(draws=5))
    assert rep.best.p90 >= rep.best.p50 > 0
    assert len(set(rep.best.makespans)) > 1


def test_lower_bound_below_every_plan(profiles, pdfs):
    graph = _ensemble(profiles, pdfs)
    ctx = _ctx(graph, PAIRS)
    draw = realise_draws(graph, ctx.units, 0, 1)[0]
    tables = build_tables(ctx, draw, None)
    lb = lower_bound(ctx, tables)
    for build in BASELINES.values():
        plan = build(ctx, draw, tables, None)
        assert _replayed(plan, ctx, draw).makespan() >= lb * 0.97


def test_greedy_close_to_exhaustive_on_tiny_instances(profiles, pdfs):
    for seed in range(2):
        graph = _ensemble(profiles, pdfs, n=120, seed=seed, tps=(1, 2, 4))
        ctx = _ctx(graph, ONE_ISLAND4)
        draw = realise_draws(graph, ctx.units, seed, 1)[0]
        tables = build_tables(ctx, draw, None)
        _, greedy = StageSearch(ctx, draw, tables, SearchConfig(), budget=None).run()
        _, best, leaves = exhaustive_plan(ctx, draw, tables, None)
        assert leaves > 10
        assert best <= greedy.makespan() + 1e-6
        assert greedy.makespan() <= 1.1 * best


def test_scaled_simulation_tracks_exact(profiles, pdfs):
    rng = np.random.default_rng(0)
    n = 4000
    prompt = rng.integers(20, 400, n).astype(np.int64)
    out = pdfs[MODELS[0]].sample(rng, n, max_tokens=512).astype(np.int64)
    work = Work(prompt, out, np.zeros(n, np.int64), np.zeros(n), np.full(n, -1, np.int64))
    prof = profiles.get(MODELS[0], 2)
    from planning.estimate import engine_for

    eng = engine_for(prof, profiles.gpu, ServingConfig())
    exact = run_work(work, eng, prof.step, 2)
    scaled = run_work(work, eng, prof.step, 2, budget=1000)
    assert exact.scale == 1 and scaled.scale >= 2
    assert abs(scaled.total_s / exact.total_s - 1) < 0.1
    gen = scaled.generated_at(scaled.total_s / 2, work)
    assert ((gen >= 0) & (gen <= out)).all() and 0 < gen.sum() < out.sum()


PRESETS = ("ensemble_1k", "chain_summary_100docs", "routing_10k")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_never_worse_than_baselines(name, profiles, pdfs):
    cluster = load_cluster(ROOT / "examples/clusters/a100x8_nvlink_pairs.yaml")
    app = load_app(
        ROOT / f"examples/paper/{name}.yaml", cluster=cluster, profiles=profiles, authors_pdfs=pdfs
    )
    rep = plan_app(app.graph, cluster, config=PlannerConfig(draws=3), compare=True)
    assert set(rep.baselines) == {"sequential", "naive", "muxserve", "static"}
    for est in rep.baselines.values():
        assert rep.best.mean <= est.mean + 1e-6
    assert rep.lower_bound is not None and rep.lower_bound <= rep.best.p50
