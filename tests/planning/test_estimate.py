"""Serving-time estimates: engine limits from a profile, draws, percentiles, errors."""

from __future__ import annotations

import numpy as np
import pytest

from planning.batching_sim import SimRequest, simulate_dp
from planning.cost_model import StepCostModel
from planning.estimate import ServingConfig, engine_for, estimate_serving_time
from planning.length_dist import LengthDistribution
from planning.profile import GpuSpec, ModelProfile

GPU = GpuSpec("test-gpu", 40 * 2**30, 1e14, 1e12)
STEP = StepCostModel(0.01, 1e-5, 3e-5, 1e-5, 2e-8, 1e-10, 256)


def _profile(weights: int = 10 * 2**30, load: float = 12.0) -> ModelProfile:
    return ModelProfile(
        model="m", tp=1, gpu=GPU.name, step=STEP, load_time_s=load,
        weight_bytes_per_gpu=weights, kv_bytes_per_token_per_gpu=400_000,
        max_model_len=2048, source="measured", fit_mape=0.05,
    )


def test_engine_limits_follow_memory_and_mode() -> None:
    eng = engine_for(_profile(), GPU, ServingConfig())
    expected = int((0.9 * GPU.memory_bytes - 10 * 2**30) // (400_000 * 16))
    assert eng.num_kv_blocks == expected - 1  # V1 keeps one null block
    assert eng.max_model_len == 2048 and eng.max_num_batched_tokens == 8192
    legacy = engine_for(_profile(), GPU, ServingConfig(mode="legacy030", max_model_len=1024))
    assert legacy.max_model_len == 1024 and legacy.max_num_batched_tokens == 2048
    assert legacy.num_kv_blocks == expected
    with pytest.raises(ValueError, match="do not fit"):
        engine_for(_profile(weights=39 * 2**30), GPU, ServingConfig())


def test_estimate_matches_direct_simulation_for_a_point_distribution() -> None:
    pmf = np.zeros(300)
    pmf[99] = 1.0  # every request generates exactly 100 tokens
    dist = LengthDistribution.from_pmf(pmf)
    eng = engine_for(_profile(), GPU, ServingConfig())
    prompts = np.full(500, 64)
    est = estimate_serving_time(prompts, dist, _profile(), eng, np.random.default_rng(0),
                                dp=2, draws=3)
    direct = simulate_dp([SimRequest(64, 100)] * 500, eng, STEP, 2).total_s + 12.0
    assert est.p50_s == pytest.approx(direct) and est.p90_s == pytest.approx(direct)
    assert est.mean_output_tokens == 100 and est.load_s == 12.0


def test_estimate_spread_caps_and_determinism() -> None:
    dist = LengthDistribution.from_pmf(np.full(1500, 1 / 1500))
    eng = engine_for(_profile(), GPU, ServingConfig())
    prompts = np.random.default_rng(1).integers(10, 400, 300)
    a = estimate_serving_time(prompts, dist, _profile(), eng, np.random.default_rng(7),
                              draws=6, max_tokens=200, include_load=False)
    b = estimate_serving_time(prompts, dist, _profile(), eng, np.random.default_rng(7),
                              draws=6, max_tokens=200, include_load=False)
    assert a == b
    assert a.p50_s <= a.p90_s <= max(a.draws_s)
    assert len(set(a.draws_s)) > 1  # independent draws differ
    assert a.mean_output_tokens <= 200 and a.load_s == 0.0


def test_estimate_rejects_bad_input() -> None:
    dist = LengthDistribution.from_pmf(np.full(10, 0.1))
    eng = engine_for(_profile(), GPU, ServingConfig())
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="request 1: prompt_len 2048"):
        estimate_serving_time([10, 2048], dist, _profile(), eng, rng)
    with pytest.raises(ValueError, match="non-empty"):
        estimate_serving_time([], dist, _profile(), eng, rng)
    with pytest.raises(ValueError, match="draws"):
        estimate_serving_time([10], dist, _profile(), eng, rng, draws=0)
