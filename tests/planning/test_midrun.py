"""Mid-run re-planning: conditional draws, resident runs, candidates, the switch decision."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.settings import load_settings
from planning.cluster import Cluster, GpuGroup, Node, place_groups
from planning.estimate import ServingConfig
from planning.graph import AppGraph, Dep, LlmCall, ModelInfo
from planning.length_scale import stretched
from planning.midrun import (
    AdjustPolicy,
    Candidate,
    MidRun,
    MidRunError,
    _moves,
    decide,
    evaluate,
)
from planning.plan import Assignment
from planning.planner import PlannerConfig, plan_app
from planning.replay import PlanContext, ReplayState
from planning.workload import build_units, realise_draws

PDFS = load_settings().shared_dir / "data" / "output_length_pdfs.json"
needs_data = pytest.mark.skipif(not PDFS.exists(), reason="../shared data not present")
MODELS = ("lmsys/vicuna-13b-v1.5", "databricks/dolly-v2-12b", "mosaicml/mpt-7b-chat")
NODE4 = Cluster((Node("n0", "A100-80GB", 4, ((0, 1), (2, 3))),))
TWO_NODES = Cluster(
    (
        Node("n0", "A100-80GB", 4, ((0, 1), (2, 3))),
        Node("n1", "A100-80GB", 4, ((0, 1), (2, 3))),
    )
)
CFG = PlannerConfig(draws=3, search_budget=300, eval_budget=600)
INF = math.inf


def _infos(profiles, pdfs, models=MODELS, tps=(1,)):
    return {m: ModelInfo(m, pdfs[m], {tp: profiles.get(m, tp) for tp in tps}) for m in models}


def _ensemble_calls(n, max_tokens, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        LlmCall(m.split("/")[1], m, rng.integers(20, 400, n), np.full(n, max_tokens))
        for m in MODELS
    )


def _g(node, *gpus):
    return GpuGroup(node, tuple(gpus))


def _a(unit, *groups, stage=0):
    return Assignment(unit, len(groups[0].gpus), len(groups), tuple(groups), stage)


# --- 1. conditional draws --------------------------------------------------------------------


@needs_data
def test_requests_with_a_prefix_draw_longer_outputs(profiles, pdfs):
    m = MODELS[0]
    info = _infos(profiles, pdfs, (m,))
    n, cap = 400, 256
    rng = np.random.default_rng(1)
    prompt = rng.integers(20, 400, n)
    prompt[-1] = info[m].max_model_len - 5  # almost no context left: the prefix still counts
    gen = np.zeros(n, np.int64)
    gen[n // 2 :] = rng.integers(1, cap, n - n // 2)
    gen[-3:] = (cap - 1, cap - 1, 100)
    call = LlmCall("c", m, prompt, np.full(n, cap), generated=gen)
    graph = AppGraph((call,), info)
    units = build_units(graph)
    part = gen > 0
    for draw in realise_draws(graph, units, 7, 5):
        out = draw.output[0]
        assert (out[part] > gen[part]).all()
        assert (out <= cap).all() and (out >= 1).all()
        assert (out[gen == cap - 1] == cap).all()
        np.testing.assert_array_equal(draw.generated[0], np.minimum(gen, out - 1))
        np.testing.assert_array_equal(draw.generated[0], gen)


@needs_data
def test_zero_prefix_draws_as_no_prefix(profiles, pdfs):
    m = MODELS[1]
    info = _infos(profiles, pdfs, (m,))
    rng = np.random.default_rng(2)
    prompt, caps = rng.integers(20, 400, 300), np.full(300, 512)
    plain = AppGraph((LlmCall("c", m, prompt, caps),), info)
    zeros = AppGraph((LlmCall("c", m, prompt, caps, generated=np.zeros(300, np.int64)),), info)
    a = realise_draws(plain, build_units(plain), 3, 2)
    b = realise_draws(zeros, build_units(zeros), 3, 2)
    for da, db in zip(a, b, strict=True):
        np.testing.assert_array_equal(da.output[0], db.output[0])
        np.testing.assert_array_equal(da.prompt[0], db.prompt[0])
        assert not da.generated[0].any() and not db.generated[0].any()


@needs_data
def test_prefixes_follow_the_requests_into_fused_units(profiles, pdfs):
    m = MODELS[0]
    info = _infos(profiles, pdfs, (m,))
    c0 = LlmCall("a", m, np.full(4, 50), np.full(4, 64))
    c1 = LlmCall(
        "b", m, np.full(4, 30), np.full(4, 64), deps=(Dep(0, np.arange(4)),),
        generated=np.array([0, 5, 0, 63]),
    )  # fmt: skip
    graph = AppGraph((c0, c1), info)
    units = build_units(graph)
    assert len(units) == 1 and units[0].calls == (0, 1)
    draw = realise_draws(graph, units, 0, 1)[0]
    np.testing.assert_array_equal(draw.generated[0], [0, 0, 0, 0, 0, 5, 0, 63])
    assert draw.output[0][5] > 5 and draw.output[0][7] == 64


@pytest.mark.parametrize(
    "gen", [np.zeros(3, np.int64), np.array([0, -1, 0, 0]), np.array([0, 0, 0, 10]),
            np.array([0, 0, 0, 11])],
)  # fmt: skip
def test_llmcall_rejects_bad_prefixes(gen):
    with pytest.raises(ValueError, match="generated"):
        LlmCall("c", "m", np.full(4, 10), np.full(4, 10), generated=gen)


def test_llmcall_prefix():
    plain = LlmCall("c", "m", np.full(3, 10), np.full(3, 10))
    np.testing.assert_array_equal(plain.prefix(), [0, 0, 0])
    call = LlmCall("c", "m", np.full(3, 10), np.full(3, 10), generated=[0, 4, 9])
    np.testing.assert_array_equal(call.prefix(), [0, 4, 9])
    assert call.prefix().dtype == np.int64 and not call.prefix().flags.writeable


# --- 2. resident runs go on without a load ---------------------------------------------------


@pytest.fixture(scope="module")
def small(profiles, pdfs):
    """A 3-model ensemble (tp 1 and 2) of 60 requests per model, and one draw."""
    graph = AppGraph(_ensemble_calls(60, 128), _infos(profiles, pdfs, tps=(1, 2)))
    units = build_units(graph)
    return graph, units, realise_draws(graph, units, 0, 1)[0]


def _replay(ctx, draw, *assignments):
    state = ReplayState(ctx, draw, None)
    for a in assignments:
        state.apply(a)
    return state


@needs_data
def test_resident_run_charges_no_load(small):
    graph, units, draw = small
    now = _a(0, _g("n0", 0))
    ctx = PlanContext(graph, units, NODE4, ServingConfig(), {0: now})
    plain = PlanContext(graph, units, NODE4, ServingConfig())
    load = ctx.profile(0, 1).load_time_s
    assert load > 0
    kept = _replay(ctx, draw, now)
    assert kept.start == [0.0] and kept.ready == [0.0]
    fresh = _replay(plain, draw, now)
    assert fresh.ready[0] - fresh.start[0] == pytest.approx(load)
    assert kept.unit_finish[0] == pytest.approx(fresh.unit_finish[0] - load)


@needs_data
@pytest.mark.parametrize(
    ("moved", "tp"),
    [(_a(0, _g("n0", 1)), 1), (_a(0, _g("n0", 0), _g("n0", 1)), 1), (_a(0, _g("n0", 0, 1)), 2)],
    ids=["other-group", "other-dp", "other-tp"],
)
def test_a_moved_run_pays_its_load(small, moved, tp):
    graph, units, draw = small
    ctx = PlanContext(graph, units, NODE4, ServingConfig(), {0: _a(0, _g("n0", 0))})
    assert not ctx.continues(moved)
    state = _replay(ctx, draw, moved)
    assert state.start[0] == 0.0
    assert state.ready[0] == pytest.approx(ctx.profile(0, tp).load_time_s)


@needs_data
def test_resident_run_launched_later_pays_its_load(small):
    graph, units, draw = small
    now = _a(0, _g("n0", 0))
    ctx = PlanContext(graph, units, NODE4, ServingConfig(), {0: now})
    state = _replay(ctx, draw, _a(1, _g("n0", 0)), now)  # another model takes its GPU first
    assert state.start[1] > 0.0
    assert state.ready[1] - state.start[1] == pytest.approx(ctx.profile(0, 1).load_time_s)


def test_continues_compares_groups_as_a_set():
    ctx = PlanContext(
        None,
        (),
        NODE4,
        ServingConfig(),
        {0: _a(0, _g("n0", 0), _g("n0", 2))},  # type: ignore[arg-type]
    )
    assert ctx.continues(_a(0, _g("n0", 2), _g("n0", 0), stage=3))
    assert not ctx.continues(_a(0, _g("n0", 2), _g("n0", 1)))
    assert not ctx.continues(_a(1, _g("n0", 0), _g("n0", 2)))


# --- 3. triggers under wrong beliefs, not under right ones -----------------------------------

SCALE = {MODELS[0]: 2.0, MODELS[1]: 0.5}  # the truth: vicuna writes twice as long, dolly half


def _stretch(infos, scale):
    return {m: ModelInfo(m, stretched(i.lengths, scale.get(m, 1.0)), i.profiles)
            for m, i in infos.items()}  # fmt: skip


def _midrun_at(belief: AppGraph, truth: AppGraph, frac: float, beliefs_now) -> tuple[MidRun, dict]:
    """Plan under ``belief``, run it under ``truth`` up to ``frac`` of its makespan, and describe
    the rest as a MidRun whose models carry ``beliefs_now``."""
    plan = plan_app(belief, NODE4, config=CFG).best.plan
    units = build_units(truth)
    ctx = PlanContext(truth, units, NODE4, ServingConfig())
    state = _replay(ctx, realise_draws(truth, units, 99, 1)[0], *plan.assignments)
    t = frac * state.makespan()
    resident, pending = {}, []
    for k, a in enumerate(state.assignments):
        if state.start[k] > t:
            pending.append(a)
        elif state.end[k] > t:
            resident[a.unit] = a
    calls, owner = [], []
    for u, unit in enumerate(units):
        assert len(unit.calls) == 1
        call = truth.calls[unit.calls[0]]
        gen = np.zeros(unit.num_requests, np.int64)
        live = state.live[u]
        if live is not None and t > live.ready:
            gen[live.index] = live.run.generated_at(t - live.ready, live.work)
        rows = np.flatnonzero(~(state.finish[u] <= t))
        if rows.size == 0:
            continue
        caps = call.max_tokens[rows]
        calls.append(LlmCall(call.name, call.model, call.base_prompt_len[rows], caps,
                             generated=np.minimum(gen[rows], caps - 1)))  # fmt: skip
        owner.append(u)
    graph = AppGraph(tuple(calls), beliefs_now)
    info = {"t": t, "makespan": state.makespan(), "plan": plan}
    return MidRun(graph, tuple(owner), NODE4, ServingConfig(), resident, tuple(pending)), info


@pytest.fixture(scope="module")
def job(profiles, pdfs):
    calls = _ensemble_calls(800, 768)
    belief = AppGraph(calls, _infos(profiles, pdfs))
    return belief, AppGraph(calls, _stretch(belief.models, SCALE))


def _look(state):
    return decide(evaluate(state, CFG), AdjustPolicy(), switches=0, since_switch_s=INF)


@needs_data
def test_switches_when_the_lengths_were_misjudged(job):
    belief, truth = job
    state, info = _midrun_at(belief, truth, 0.15, truth.models)
    assert state.resident and any(c.prefix().any() for c in state.graph.calls)
    assert 0 < info["t"] < info["makespan"]
    d = _look(state)
    assert d.switch, d.reason
    assert d.chosen.name in ("keep", "fresh")
    assert d.chosen.p50 < d.current.p50
    assert d.gain_s == pytest.approx(d.current.p50 - d.chosen.p50)
    assert d.gain_s > d.margin_s >= AdjustPolicy().min_gain_s


@needs_data
def test_no_switch_before_the_beliefs_are_recalibrated(job):
    belief, truth = job
    state, _ = _midrun_at(belief, truth, 0.15, belief.models)
    d = _look(state)
    assert not d.switch and d.chosen is d.current


@needs_data
def test_no_switch_when_the_beliefs_were_right(job):
    belief, _ = job
    state, _ = _midrun_at(belief, belief, 0.15, belief.models)
    cands = evaluate(state, CFG)
    assert [c.name for c in cands] == ["current", "keep", "fresh"]
    d = decide(cands, AdjustPolicy(), switches=0, since_switch_s=INF)
    assert not d.switch, d.reason
    assert d.chosen is d.current and d.gain_s <= d.margin_s


# --- 4. the decision: margin, hysteresis, cool-down, win share -------------------------------


def _cand(name, spans, reload_s=0.0):
    return Candidate(name, (), tuple(spans), (), reload_s, 0)


CUR = _cand("current", [100.0] * 5)
POL = AdjustPolicy(min_gain_s=20.0, cost_margin=1.0)  # explicit: the tests do not lean on defaults


def test_gain_just_above_the_margin_switches_only_before_any_switch():
    pol = POL  # floor: max(20 s, 5 % of 100 s) = 20 s
    best = _cand("keep", [79.0] * 5)
    d = decide([CUR, best], pol, switches=0, since_switch_s=INF)
    assert d.switch and d.chosen is best and d.margin_s == pytest.approx(20.0)
    d = decide([CUR, best], pol, switches=1, since_switch_s=INF)
    assert not d.switch and d.chosen is CUR
    assert d.margin_s == pytest.approx(20.0 * (1 + pol.hysteresis))
    d = decide([CUR, _cand("keep", [59.0] * 5)], pol, switches=1, since_switch_s=INF)
    assert d.switch
    d = decide([CUR, _cand("keep", [59.0] * 5)], pol, switches=2, since_switch_s=INF)
    assert not d.switch and d.margin_s == pytest.approx(60.0)


def test_gain_at_the_margin_does_not_switch():
    d = decide([CUR, _cand("keep", [80.0] * 5)], POL, switches=0, since_switch_s=INF)
    assert not d.switch


def test_margin_grows_with_the_remaining_time():
    cur = _cand("current", [1000.0] * 3)
    d = decide([cur, _cand("fresh", [960.0] * 3)], POL, switches=0, since_switch_s=INF)
    assert not d.switch and d.margin_s == pytest.approx(50.0)


def test_no_switch_during_the_cool_down():
    pol = POL
    best = _cand("fresh", [10.0] * 5)
    d = decide([CUR, best], pol, switches=1, since_switch_s=pol.cooldown_s - 1.0)
    assert not d.switch and "cool" in d.reason
    assert decide([CUR, best], pol, switches=1, since_switch_s=pol.cooldown_s).switch


def test_a_candidate_that_wins_too_few_draws_is_refused():
    best = _cand("keep", [50.0, 50.0, 50.0, 150.0, 150.0])  # median gain 50 s, wins 3 of 5
    d = decide([CUR, best], POL, switches=0, since_switch_s=INF)
    assert not d.switch and "60%" in d.reason
    assert decide([CUR, best], AdjustPolicy(win_share=0.6), switches=0, since_switch_s=INF).switch


def test_best_is_the_lowest_median_then_p90():
    a = _cand("keep", [50.0, 50.0, 60.0, 60.0, 60.0])
    b = _cand("fresh", [50.0, 50.0, 60.0, 60.0, 90.0])
    c = _cand("fresh", [40.0] * 5)
    assert decide([CUR, b, a], POL, switches=0, since_switch_s=INF).chosen is a
    assert decide([CUR, a, c], POL, switches=0, since_switch_s=INF).chosen is c


# Candidate.p50 of infinite makespans is numpy's nan (inf - inf), with a RuntimeWarning
NAN_PERCENTILE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NAN_PERCENTILE
def test_an_infeasible_current_plan_switches_at_once():
    cur = _cand("current", [INF] * 3)
    best = _cand("fresh", [500.0] * 3, reload_s=400.0)
    worse = _cand("keep", [INF] * 3)
    d = decide([cur, worse, best], POL, switches=5, since_switch_s=0.0)
    assert d.switch and d.chosen is best and d.gain_s == INF
    d = decide([cur, worse], POL, switches=0, since_switch_s=INF)
    assert not d.switch and d.chosen is cur


def test_margin_covers_the_reload_of_moved_models():
    pol = POL
    best = _cand("fresh", [55.0] * 5, reload_s=50.0)  # gain 45 s
    d = decide([CUR, best], pol, switches=0, since_switch_s=INF)
    assert not d.switch and d.margin_s >= pol.cost_margin * 50.0
    d = decide([CUR, best], AdjustPolicy(cost_margin=2.0), switches=0, since_switch_s=INF)
    assert d.margin_s >= 100.0
    assert decide([CUR, best], AdjustPolicy(cost_margin=0.0), switches=0,
                  since_switch_s=INF).switch  # fmt: skip
    cheap = _cand("fresh", [55.0] * 5, reload_s=10.0)
    assert decide([CUR, cheap], pol, switches=0, since_switch_s=INF).switch


# --- 5. placement: preferred groups, allowed groups, islands and nodes -----------------------


def _island_ok(cluster, g):
    node = cluster.node(g.node)
    return any(set(g.gpus) <= set(isl) for isl in node.islands)


def test_place_keeps_a_free_preferred_group():
    got = place_groups(NODE4, [1, 1], prefer=[_g("n0", 3), None])
    assert got is not None and got[0] == _g("n0", 3) and got[1] != _g("n0", 3)
    got = place_groups(NODE4, [2, 1], prefer=[None, _g("n0", 1)])
    assert got == [_g("n0", 2, 3), _g("n0", 1)]
    got = place_groups(TWO_NODES, [2], prefer=[_g("n1", 2, 3)])
    assert got == [_g("n1", 2, 3)]


def test_place_ignores_a_taken_or_ill_sized_preferred_group():
    got = place_groups(NODE4, [1], taken=frozenset({("n0", 3)}), prefer=[_g("n0", 3)])
    assert got is not None and got[0] != _g("n0", 3) and got[0].gpus[0] != 3
    got = place_groups(NODE4, [2], prefer=[_g("n0", 3)])
    assert got is not None and len(got[0].gpus) == 2
    got = place_groups(NODE4, [1], prefer=[_g("n0", 2, 3)])
    assert got is not None and len(got[0].gpus) == 1
    got = place_groups(NODE4, [1, 1], prefer=[_g("n0", 2), _g("n0", 2)])  # both want GPU 2
    assert got is not None and got[0] == _g("n0", 2) and got[1] != _g("n0", 2)


def test_place_moves_a_preferred_group_when_keeping_it_leaves_no_room():
    # keeping GPU 1 leaves the pair (2, 3) for the tp=2 slot
    got = place_groups(NODE4, [1, 2], prefer=[_g("n0", 1), None])
    assert got == [_g("n0", 1), _g("n0", 2, 3)]
    # keeping GPUs 1 and 2 would split both pairs: everything is placed afresh
    got = place_groups(NODE4, [1, 2, 1], prefer=[_g("n0", 1), None, _g("n0", 2)])
    assert got is not None
    assert sorted(x for g in got for x in g.gpus) == [0, 1, 2, 3]
    assert all(_island_ok(NODE4, g) for g in got)


def test_place_uses_only_allowed_groups():
    allowed = frozenset({_g("n0", 0), _g("n0", 2, 3)})
    assert place_groups(NODE4, [1, 2], allowed=allowed) == [_g("n0", 0), _g("n0", 2, 3)]
    assert place_groups(NODE4, [1, 1], allowed=allowed) is None  # GPUs 2, 3 only as a pair
    assert place_groups(NODE4, [2, 2], allowed=allowed) is None
    assert place_groups(NODE4, [1], allowed=allowed, taken=frozenset({("n0", 0)})) is None
    got = place_groups(NODE4, [1], allowed=allowed, prefer=[_g("n0", 1)])
    assert got == [_g("n0", 0)]  # the preferred group has no worker
    both = frozenset({_g("n0", 1), _g("n1", 0), _g("n1", 2, 3)})
    got = place_groups(TWO_NODES, [1, 1, 2], allowed=both)
    assert got is not None and set(got) == both


def test_tp_groups_stay_inside_one_island_of_one_node():
    got = place_groups(TWO_NODES, [2, 2, 2, 2])
    assert got is not None and len(set(got)) == 4
    assert {g.node for g in got} == {"n0", "n1"}
    assert all(_island_ok(TWO_NODES, g) for g in got)
    assert place_groups(TWO_NODES, [2] * 5) is None
    # four free GPUs, but only one free pair: GPUs 0 (n0) and 3 (n1) never form a group
    taken = frozenset({("n0", 1), ("n0", 2), ("n0", 3), ("n1", 2)})
    assert place_groups(TWO_NODES, [2, 2], taken=taken) is None
    assert place_groups(TWO_NODES, [2], taken=taken) == [_g("n1", 0, 1)]
    # dp replicas of one model may sit on different nodes
    got = place_groups(TWO_NODES, [2, 2], taken=frozenset({("n0", 0), ("n1", 3)}))
    assert got is not None and set(got) == {_g("n0", 2, 3), _g("n1", 0, 1)}
    assert place_groups(TWO_NODES, [2, 2, 2], taken=frozenset({("n0", 0), ("n1", 3)})) is None
    got = place_groups(TWO_NODES, [1, 1, 1, 1, 1], taken=frozenset({("n0", 0), ("n0", 1)}))
    assert got is not None and {g.node for g in got} == {"n0", "n1"}


# --- 6. evaluate: resident runs, caller unit ids, infeasible current -------------------------


@pytest.fixture(scope="module")
def started(profiles, pdfs):
    """A 3-model ensemble (tp 1) just after its first stage launched, its models mirrored onto
    other GPUs (i -> 3 - i), under caller unit ids 7, 3, 5."""
    graph = AppGraph(_ensemble_calls(300, 256), _infos(profiles, pdfs))
    plan = plan_app(graph, NODE4, config=CFG).best.plan
    ids = (7, 3, 5)

    def mirror(a, stage):
        groups = tuple(_g(g.node, *sorted(3 - i for i in g.gpus)) for g in a.groups)
        return Assignment(ids[a.unit], a.tp, a.dp, groups, stage)

    resident = {ids[a.unit]: mirror(a, 0) for a in plan.assignments if a.stage == 0}
    assert any(
        set(now.groups) != set(a.groups)
        for a in plan.assignments
        if a.stage == 0
        for now in [resident[ids[a.unit]]]
    ), "mirroring left every model where the planner puts it"
    pending = tuple(mirror(a, a.stage) for a in plan.assignments if a.stage > 0)
    return MidRun(graph, ids, NODE4, ServingConfig(), resident, pending)


@needs_data
def test_fresh_plan_keeps_resident_runs_without_stopping_them(started):
    cands = {c.name: c for c in evaluate(started, CFG)}
    fresh, current = cands["fresh"], cands["current"]
    assert current.assignments == started.pending
    assert all(math.isfinite(x) for c in cands.values() for x in c.makespans)
    assert {a.unit for c in cands.values() for a in c.assignments} <= {7, 3, 5}
    first = {}
    for a in fresh.assignments:
        first.setdefault(a.unit, a)
    kept = [u for u, now in started.resident.items()
            if (now.tp, now.dp, set(now.groups)) == (first[u].tp, first[u].dp,
                                                     set(first[u].groups))]  # fmt: skip
    assert set(kept) == set(started.resident), "the fresh plan moved a running model"
    assert fresh.stopped == () and fresh.reload_s == 0.0 and fresh.recompute_tokens == 0
    # the same runs, none reloaded: the fresh plan's estimate is the current one's
    assert fresh.makespans == pytest.approx(current.makespans)


@needs_data
def test_keep_starts_from_the_resident_runs(started):
    keep = next(c for c in evaluate(started, CFG) if c.name == "keep")
    assert keep.stopped == () and keep.reload_s == 0.0
    assert set(started.resident) | {a.unit for a in keep.assignments} == {7, 3, 5}


@needs_data
@NAN_PERCENTILE
def test_a_unit_without_gpus_makes_the_current_plan_infeasible(profiles, pdfs):
    graph = AppGraph(_ensemble_calls(80, 128), _infos(profiles, pdfs))
    allowed = frozenset({_g("n0", 0), _g("n0", 1), _g("n0", 2)})  # GPU 3's worker is lost
    state = MidRun(graph, (0, 1, 2), NODE4, ServingConfig(), {0: _a(0, _g("n0", 0))}, (),
                   allowed)  # fmt: skip
    cands = evaluate(state, CFG)
    cur = cands[0]
    assert cur.name == "current" and all(x == INF for x in cur.makespans)
    for c in cands[1:]:
        assert all(math.isfinite(x) for x in c.makespans)
        assert all(g in allowed for a in c.assignments for g in a.groups)
    d = decide(cands, AdjustPolicy(), switches=3, since_switch_s=0.0)
    assert d.switch and d.chosen.name in ("keep", "fresh")


@needs_data
def test_midrun_error_when_units_do_not_match_the_job(profiles, pdfs):
    m = MODELS[0]
    c0 = LlmCall("a", m, np.full(4, 50), np.full(4, 64))
    c1 = LlmCall("b", m, np.full(4, 30), np.full(4, 64), deps=(Dep(0, np.arange(4)),))
    chain = AppGraph((c0, c1), _infos(profiles, pdfs, (m,)))
    with pytest.raises(MidRunError, match="spans several"):
        evaluate(MidRun(chain, (0, 1), NODE4, ServingConfig()), CFG)
    ens = AppGraph(_ensemble_calls(20, 64)[:2], _infos(profiles, pdfs, MODELS[:2]))
    with pytest.raises(MidRunError, match="split"):
        evaluate(MidRun(ens, (4, 4), NODE4, ServingConfig()), CFG)


@needs_data
def test_a_run_relaunched_after_another_model_counts_as_stopped(small):
    graph, units, draw = small
    now = _a(0, _g("n0", 0))
    ctx = PlanContext(graph, units, NODE4, ServingConfig(), {0: now})
    rest = (_a(1, _g("n0", 0)), _a(0, _g("n0", 0), stage=1))
    state = _replay(ctx, draw, *rest)
    assert state.ready[1] > state.start[1] > 0.0  # the replay reloads it
    stopped, reload_s, _ = _moves(ctx, draw, {0: now}, rest, False)
    assert stopped == {0}
    assert reload_s == pytest.approx(ctx.profile(0, 1).load_time_s)


@NAN_PERCENTILE
def test_median_of_draws_with_one_infinite():
    c = _cand("keep", [10.0, 20.0, 30.0, 40.0, INF])
    assert c.p50 == pytest.approx(30.0)
    assert c.p90 == INF
