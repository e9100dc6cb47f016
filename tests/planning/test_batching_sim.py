"""Simulator invariants and cross-checks against the naive reference scheduler."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planning.batching_sim import (
    EngineConfig,
    SimRequest,
    assign_replicas,
    simulate,
    simulate_dp,
)
from planning.cost_model import StepCostModel
from tests.planning.sim_reference import run_reference

COST = StepCostModel(
    c_const=0.012,
    c_tokens=2e-5,
    c_knee=6e-5,
    c_seqs=3e-5,
    c_context=4e-8,
    c_attn=1e-9,
    knee_tokens=256,
)


@st.composite
def workloads(draw: st.DrawFn, chains: bool = False) -> tuple[list[SimRequest], EngineConfig]:
    mode = draw(st.sampled_from(["v1", "legacy030"]))
    bs = draw(st.sampled_from([1, 4, 16]))
    max_len = draw(st.integers(64, 512))
    n = draw(st.integers(1, 40))
    reqs = []
    for _ in range(n):
        p = draw(st.integers(1, max_len - 1))
        o = draw(st.integers(1, 300))
        g = draw(st.integers(0, max(0, min(o, max_len - p) - 1))) if draw(st.booleans()) else 0
        a = draw(st.sampled_from([0.0, 0.0, draw(st.floats(0, 3))]))
        reqs.append(SimRequest(prompt_len=p, output_len=o, arrival_s=a, generated=g))
    if chains:  # each request may wait for one placed before it in a random order: acyclic
        perm = draw(st.permutations(range(n)))
        for k in range(1, n):
            if draw(st.integers(0, 3)) > 0:
                parent = perm[draw(st.integers(0, k - 1))]
                reqs[perm[k]] = dataclasses.replace(reqs[perm[k]], after=parent)
    max_seqs = draw(st.integers(1, 12))
    mbt = draw(st.integers(max(max_seqs, max_len if mode == "legacy030" else 1), 1024))
    need = _cdiv(max_len + 1, bs) + 2  # room for the longest request alone
    if mode == "legacy030":
        need = _cdiv(need * 100, 95) + 1  # and for it beside a watermark of up to 5%
    blocks = draw(st.integers(need, need * 6))
    cfg = EngineConfig(
        num_kv_blocks=blocks,
        max_model_len=max_len,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=mbt,
        block_size=bs,
        mode=mode,
        chunked_prefill=draw(st.booleans()) or mode == "legacy030" or mbt < max_len,
        reserve_full_isl=draw(st.booleans()),
        watermark=draw(st.sampled_from([0.0, 0.0, 0.01, 0.05])) if mode == "legacy030" else 0.0,
    )
    return reqs, cfg


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_bulk_skipping_equals_step_by_step_and_reference(case) -> None:
    reqs, cfg = case
    fast = simulate(reqs, cfg, COST)
    slow = simulate(reqs, cfg, COST, bulk=False)
    ref = run_reference(reqs, cfg, COST)
    assert fast.num_steps == slow.num_steps == ref.num_steps
    assert fast.num_preemptions == slow.num_preemptions == ref.preemptions
    np.testing.assert_allclose(fast.finish_s, slow.finish_s, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.finish_s, ref.finish_s, rtol=1e-9, atol=1e-9)
    assert math.isclose(fast.total_s, max(ref.finish_s), rel_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_invariants(case) -> None:
    reqs, cfg = case
    res = simulate(reqs, cfg, COST, record_steps=True)
    ref = run_reference(reqs, cfg, COST)
    log = res.steps
    assert log is not None and len(log.end_s) == res.num_steps
    assert np.all(np.diff(log.end_s) >= 0)  # clock monotone
    assert np.all(log.latency_s > 0)
    # KV never over capacity, counted independently by the reference scheduler too.
    assert ref.max_blocks <= cfg.num_kv_blocks
    assert int(log.kv_blocks.max()) == ref.max_blocks
    assert np.all(log.num_seqs <= cfg.max_num_seqs)
    targets = [min(r.output_len, cfg.max_model_len - r.prompt_len) for r in reqs]
    end = res.snapshot(res.total_s)
    assert end.finished.all()
    assert list(end.generated) == targets  # each request ends at exactly its target
    # Tokens conserved: every request computes its prompt and all but its last token once,
    # plus whatever preemption throws away (vLLM 0.3.0 also counts padding).
    computed = int(log.prefill_tokens.sum() + log.decode_seqs.sum())
    base = sum(r.prompt_len + t - 1 for r, t in zip(reqs, targets, strict=True))
    if cfg.mode == "v1":
        assert computed == ref.tokens_computed
        assert computed == base if res.num_preemptions == 0 else computed > base
    assert computed >= base


def test_preempted_requests_recompute_and_finish() -> None:
    cfg = EngineConfig(num_kv_blocks=24, max_model_len=512, max_num_seqs=8, block_size=16)
    reqs = [SimRequest(prompt_len=60, output_len=200) for _ in range(6)]
    res = simulate(reqs, cfg, COST, record_steps=True)
    assert res.num_preemptions > 0
    assert res.steps is not None and res.steps.preempted.sum() == res.num_preemptions
    assert np.isfinite(res.finish_s).all()
    assert list(res.snapshot(res.total_s).generated) == [200] * 6


@pytest.mark.parametrize("blocks", [4000, 60])  # 60 blocks: requests are preempted
def test_snapshot_is_monotone_and_partial(blocks: int) -> None:
    cfg = EngineConfig(num_kv_blocks=blocks, max_model_len=700)
    rng = np.random.default_rng(3)
    prompts, outs = rng.integers(10, 300, 50), rng.integers(5, 400, 50)
    reqs = [SimRequest(int(p), int(o)) for p, o in zip(prompts, outs, strict=True)]
    res = simulate(reqs, cfg, COST)
    assert (res.num_preemptions > 0) == (blocks == 60)
    prev = np.zeros(len(reqs), dtype=np.int64)
    for t in np.linspace(0, res.total_s, 25):
        snap = res.snapshot(float(t))
        assert np.all(snap.generated >= prev)
        assert np.all(snap.generated[snap.finished] == outs[snap.finished])
        prev = snap.generated
    mid = res.snapshot(res.total_s / 2)
    assert 0 < mid.finished.sum() < len(reqs)


def test_requests_arrive_over_time() -> None:
    cfg = EngineConfig(num_kv_blocks=4000, max_model_len=2048)
    reqs = [SimRequest(100, 50, arrival_s=0.0), SimRequest(100, 50, arrival_s=100.0)]
    res = simulate(reqs, cfg, COST)
    assert res.finish_s[0] < 100.0 < res.finish_s[1]
    alone = simulate([SimRequest(100, 50)], cfg, COST).total_s
    assert math.isclose(res.finish_s[1] - 100.0, alone, rel_tol=1e-9)


def test_dp_time_is_slowest_replica() -> None:
    cfg = EngineConfig(num_kv_blocks=4000, max_model_len=2048)
    reqs = [SimRequest(50, 10 + 40 * (i % 5)) for i in range(40)]
    res = simulate_dp(reqs, cfg, COST, dp=3)
    alone = [simulate([reqs[i] for i in part], cfg, COST) for part in res.assignment]
    assert res.total_s == max(r.total_s for r in alone)  # each replica is independent
    for part, r in zip(res.assignment, alone, strict=True):
        np.testing.assert_array_equal(res.finish_s[part], r.finish_s)
    assert sorted(i for part in res.assignment for i in part) == list(range(40))
    assert res.assignment[0][:3] == [0, 3, 6]
    single = simulate(reqs, cfg, COST).total_s
    assert res.total_s < single
    snap = res.snapshot(res.total_s)
    assert snap.finished.all() and list(snap.generated) == [r.output_len for r in reqs]
    balanced = assign_replicas(reqs, 3, "balanced")
    loads = [sum(reqs[i].prompt_len + reqs[i].output_len for i in part) for part in balanced]
    assert max(loads) - min(loads) <= 210


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_kv_blocks": 0, "max_model_len": 10}, "num_kv_blocks"),
        (
            {
                "num_kv_blocks": 10,
                "max_model_len": 10,
                "max_num_batched_tokens": 8,
                "max_num_seqs": 16,
            },
            "max_num_batched_tokens",
        ),
        ({"num_kv_blocks": 10, "max_model_len": 10, "mode": "v2"}, "mode"),
        (
            {
                "num_kv_blocks": 10,
                "max_model_len": 512,
                "max_num_batched_tokens": 256,
                "chunked_prefill": False,
            },
            "max_num_batched_tokens must be >= max_model_len",
        ),
        (
            {
                "num_kv_blocks": 10,
                "max_model_len": 512,
                "max_num_batched_tokens": 256,
                "mode": "legacy030",
            },
            "max_num_batched_tokens must be >= max_model_len",
        ),
    ],
)
def test_engine_config_errors_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_bad_requests_name_the_request() -> None:
    cfg = EngineConfig(num_kv_blocks=100, max_model_len=100)
    with pytest.raises(ValueError, match="request 1: prompt_len"):
        simulate([SimRequest(10, 5), SimRequest(100, 5)], cfg, COST)
    with pytest.raises(ValueError, match="request 0"):
        simulate([SimRequest(10, 0)], cfg, COST)
    out = simulate([SimRequest(90, 50)], cfg, COST)  # clipped to the context left
    assert list(out.snapshot(out.total_s).generated) == [10]


def test_admission_reserves_the_whole_known_sequence() -> None:
    # Chunked prefill would admit the second request's first chunk and then thrash; with
    # vLLM's reserve_full_isl it waits until its whole prompt fits.
    cfg = EngineConfig(
        num_kv_blocks=20, max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8
    )
    reqs = [SimRequest(100, 200), SimRequest(250, 10)]
    full = simulate(reqs, cfg, COST)
    assert full.num_preemptions == 0
    assert full.finish_s[1] > full.finish_s[0]  # it ran after the first one finished
    chunk_only = simulate(reqs, dataclasses.replace(cfg, reserve_full_isl=False), COST)
    assert chunk_only.num_preemptions > 0


# ---------------------------------------------------------------- requests waiting for others

CONST = StepCostModel(  # every step takes one second: finish times count steps
    c_const=1.0, c_tokens=0.0, c_knee=0.0, c_seqs=0.0, c_context=0.0, c_attn=0.0, knee_tokens=0
)
SMALL = EngineConfig(num_kv_blocks=200, max_model_len=256, max_num_batched_tokens=256)


def _both(reqs: list[SimRequest], cfg: EngineConfig = SMALL) -> np.ndarray:
    """Finish times, checked equal with and without bulk skipping and in the reference."""
    fast = simulate(reqs, cfg, CONST)
    slow = simulate(reqs, cfg, CONST, bulk=False)
    ref = run_reference(reqs, cfg, CONST)
    np.testing.assert_array_equal(fast.finish_s, slow.finish_s)
    np.testing.assert_array_equal(fast.finish_s, ref.finish_s)
    assert fast.num_steps == slow.num_steps == ref.num_steps
    return fast.finish_s


def test_two_link_chain_runs_one_after_the_other() -> None:
    # A: prefill step 1 (1st token), decodes 2-3: done at 3. B arrives at 3, runs steps 4-5.
    reqs = [SimRequest(10, 3), SimRequest(10, 2, after=0)]
    assert list(_both(reqs)) == [3.0, 5.0]
    res = simulate(reqs, SMALL, CONST)
    assert res.num_steps == 5 and res.total_s == 5.0


def test_three_link_chain_beside_an_independent_request() -> None:
    # D decodes throughout; B is admitted in step 4 (after A ends step 3), C in step 6.
    reqs = [
        SimRequest(10, 3),
        SimRequest(10, 2, after=0),
        SimRequest(10, 4, after=1),
        SimRequest(10, 6),
    ]
    assert list(_both(reqs)) == [3.0, 5.0, 9.0, 6.0]


def test_dependant_arrival_is_the_later_of_its_own_and_the_finish() -> None:
    early = [SimRequest(10, 3), SimRequest(10, 2, arrival_s=1.5, after=0)]
    assert list(_both(early)) == [3.0, 5.0]  # waits for A although it "arrived" at 1.5
    late = [SimRequest(10, 3), SimRequest(10, 2, arrival_s=10.0, after=0)]
    assert list(_both(late)) == [3.0, 12.0]  # idle from 3 to 10, then steps 11-12
    # Its arrival (not its arrival_s) also orders it against a root: the root arrived at 2.5.
    cfg = dataclasses.replace(SMALL, max_num_seqs=1)
    order = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 2, arrival_s=2.5)]
    assert list(_both(order, cfg)) == [3.0, 7.0, 5.0]


def test_arrivals_queue_by_arrival_then_index() -> None:
    # A ends at 3; D keeps decoding and holds the second of two seats. In step 4 (3 -> 4) the
    # dependant (arrival_s 3.2) and a root (3.5) both arrive: the dependant is admitted first.
    cfg = dataclasses.replace(SMALL, max_num_seqs=2)
    reqs = [
        SimRequest(10, 3),
        SimRequest(10, 2, arrival_s=3.2, after=0),
        SimRequest(10, 2, arrival_s=3.5),
        SimRequest(10, 10),
    ]
    assert list(_both(reqs, cfg)) == [3.0, 6.0, 8.0, 10.0]
    # A root arriving exactly when the dependant is released: the lower index goes first.
    one = dataclasses.replace(SMALL, max_num_seqs=1)
    tie = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 2, arrival_s=3.0)]
    assert list(_both(tie, one)) == [3.0, 5.0, 7.0]
    tie_root_first = [tie[0], tie[2], dataclasses.replace(tie[1])]
    assert list(_both(tie_root_first, one)) == [3.0, 5.0, 7.0]


def test_fan_out_two_requests_after_one() -> None:
    reqs = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 4, after=0)]
    assert list(_both(reqs)) == [3.0, 5.0, 7.0]  # both admitted in step 4
    one = dataclasses.replace(SMALL, max_num_seqs=1)  # one at a time, ties by index
    assert list(_both(reqs, one)) == [3.0, 5.0, 9.0]
    swapped = [reqs[0], reqs[2], reqs[1]]
    assert list(_both(swapped, one)) == [3.0, 7.0, 9.0]


def test_chain_in_legacy030_mode() -> None:
    # 0.3.0 runs a prefill-only step for B (step 4) in which D does not decode.
    cfg = dataclasses.replace(SMALL, mode="legacy030")
    reqs = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 6)]
    assert list(_both(reqs, cfg)) == [3.0, 5.0, 7.0]
    chain = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 4, after=1)]
    assert list(_both(chain, cfg)) == [3.0, 5.0, 9.0]


def test_snapshot_before_a_dependant_arrives() -> None:
    reqs = [SimRequest(10, 3), SimRequest(10, 2, after=0), SimRequest(10, 3, generated=1, after=1)]
    res = simulate(reqs, SMALL, CONST)
    assert list(res.finish_s) == [3.0, 5.0, 7.0]
    expect = {  # time: tokens generated per request (request 2 brings one from elsewhere)
        0.0: [0, 0, 1],
        2.5: [2, 0, 1],
        3.0: [3, 0, 1],  # A done at the end of step 3; B not scheduled in that step
        4.0: [3, 1, 1],
        5.0: [3, 2, 1],
        6.0: [3, 2, 2],
        7.0: [3, 2, 3],
    }
    for t, gen in expect.items():
        snap = res.snapshot(t)
        assert list(snap.generated) == gen, t
        assert list(snap.finished) == [t >= f for f in res.finish_s], t


@pytest.mark.parametrize(
    "afters, match",
    [
        ([-1, 1], "request 1: after=1 refers to the request itself"),
        ([-1, 2], "request 1: after=2 must be -1 or the index"),
        ([-3, -1], "request 0: after=-3 must be -1"),
        ([1, 0], "request 0: its after chain forms a cycle \\(0 -> 1 -> 0\\)"),
        ([-1, 2, 3, 1], "request 1: its after chain forms a cycle \\(1 -> 2 -> 3 -> 1\\)"),
    ],
)
def test_bad_after_names_the_request(afters: list[int], match: str) -> None:
    reqs = [SimRequest(10, 2, after=a) for a in afters]
    with pytest.raises(ValueError, match=match):
        simulate(reqs, SMALL, CONST)
    with pytest.raises(ValueError, match=match):
        assign_replicas(reqs, 2)


@settings(max_examples=150, deadline=None)
@given(workloads(chains=True))
def test_chains_bulk_equals_step_by_step_and_reference(case) -> None:
    reqs, cfg = case
    fast = simulate(reqs, cfg, COST, record_steps=True)
    slow = simulate(reqs, cfg, COST, bulk=False)
    ref = run_reference(reqs, cfg, COST)
    assert fast.num_steps == slow.num_steps == ref.num_steps
    assert fast.num_preemptions == slow.num_preemptions == ref.preemptions
    np.testing.assert_allclose(fast.finish_s, slow.finish_s, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.finish_s, ref.finish_s, rtol=1e-9, atol=1e-9)
    assert fast.steps is not None and int(fast.steps.kv_blocks.max()) == ref.max_blocks
    for i, r in enumerate(reqs):
        if r.after >= 0:  # nothing of a dependant runs before the step after its parent ends
            p = float(fast.finish_s[r.after])
            assert fast.finish_s[i] > p
            snap = fast.snapshot(p)
            assert snap.generated[i] == r.generated and not snap.finished[i]
    end = fast.snapshot(fast.total_s)
    assert end.finished.all()
    assert list(end.generated) == [
        min(r.output_len, cfg.max_model_len - r.prompt_len) for r in reqs
    ]


def _docs(n_docs: int, chunks: int) -> list[SimRequest]:
    """Request d * chunks + k summarises chunk k of document d after chunk k - 1."""
    return [
        SimRequest(20 + 7 * d, 5 + 3 * k + d, after=-1 if k == 0 else d * chunks + k - 1)
        for d in range(n_docs)
        for k in range(chunks)
    ]


def test_dp_keeps_chains_on_one_replica() -> None:
    reqs = _docs(5, 3)
    rr = assign_replicas(reqs, 2)
    assert rr == [[0, 1, 2, 6, 7, 8, 12, 13, 14], [3, 4, 5, 9, 10, 11]]  # docs dealt in turn
    # A fan-out tree is a unit too, and a chain's root order is its first request's arrival.
    tree = [
        SimRequest(10, 5, arrival_s=1.0),
        SimRequest(10, 5, after=0),
        SimRequest(10, 5),
        SimRequest(10, 5, after=0),
        SimRequest(10, 5, after=3),
    ]
    assert assign_replicas(tree, 2) == [[2], [0, 1, 3, 4]]
    for policy in ("round_robin", "balanced"):
        res = simulate_dp(reqs, SMALL, CONST, dp=3, policy=policy)
        owner = {i: d for d, part in enumerate(res.assignment) for i in part}
        assert sorted(owner) == list(range(len(reqs)))
        for i, r in enumerate(reqs):
            if r.after >= 0:
                assert owner[i] == owner[r.after]
                assert res.finish_s[i] > res.finish_s[r.after]
        for part, rep in zip(res.assignment, res.replicas, strict=True):
            local = [
                dataclasses.replace(
                    reqs[i], after=-1 if reqs[i].after < 0 else part.index(reqs[i].after)
                )
                for i in part
            ]
            np.testing.assert_array_equal(rep.finish_s, simulate(local, SMALL, CONST).finish_s)
        snap = res.snapshot(res.total_s)
        assert snap.finished.all() and list(snap.generated) == [r.output_len for r in reqs]


def test_dp_balanced_weighs_whole_chains() -> None:
    # Document 0 is one long chain (3 x 300 tokens); documents 1-3 are single 300-token requests.
    reqs = [
        SimRequest(100, 200),
        SimRequest(100, 200, after=0),
        SimRequest(100, 200, after=1),
        SimRequest(100, 200),
        SimRequest(100, 200),
        SimRequest(100, 200),
    ]
    assert assign_replicas(reqs, 2, "balanced") == [[0, 1, 2], [3, 4, 5]]
    assert assign_replicas(reqs, 2, "round_robin") == [[0, 1, 2, 4], [3, 5]]


@pytest.mark.parametrize("mode", ["v1", "legacy030"])
def test_resident_requests_decode_without_a_prefill(mode: str) -> None:
    """A request already running on the replica (the sim engine re-simulating after a new one
    joined) goes on decoding: no prefill step, its KV counted from the first step."""
    cfg = EngineConfig(num_kv_blocks=4000, max_model_len=4096, max_num_seqs=8,
                       max_num_batched_tokens=4096, block_size=16, mode=mode)  # fmt: skip
    res = simulate([SimRequest(1000, 50, generated=10, resident=True)], cfg, COST,
                   record_steps=True)  # fmt: skip
    assert res.num_steps == 40 and res.steps is not None
    assert (res.steps.prefill_tokens == 0).all()
    # the first decode step attends the prompt and the 9 generated tokens before the last
    assert res.total_s == pytest.approx(COST.decode_run_latency(1, 1000 + 10, 40))
    assert list(res.snapshot(res.total_s / 2).generated)[0] in range(11, 50)
    again = simulate([SimRequest(1000, 50, generated=10)], cfg, COST)  # a moved prefix
    assert again.total_s > res.total_s + 0.5 * COST.step_latency(1000, 0, 1, 1000, 0)
    with pytest.raises(ValueError, match="resident"):
        simulate([SimRequest(100, 50, resident=True)], cfg, COST)


def test_continuing_from_residents_matches_the_uninterrupted_run() -> None:
    """Stop a schedule at a decode-only moment, continue its running requests as residents:
    the rest takes what the uninterrupted run took (what the sim engine relies on)."""
    cfg = EngineConfig(num_kv_blocks=4000, max_model_len=2048, max_num_seqs=64, block_size=16)
    reqs = [SimRequest(50 + 13 * i, 40 + 7 * i) for i in range(30)]
    full = simulate(reqs, cfg, COST)
    t = full.total_s / 2
    snap = full.snapshot(t)
    rest = [
        SimRequest(r.prompt_len, r.output_len, generated=int(g), resident=g > 0)
        for r, g, done in zip(reqs, snap.generated, snap.finished, strict=True)
        if not done
    ]
    assert all(r.resident for r in rest)  # every prompt was in by then
    cont = simulate(rest, cfg, COST)
    assert t + cont.total_s == pytest.approx(full.total_s, rel=0.03)
