"""Tests for planning.cost_model and planning.profile: fitting, NNLS, tp, memory, analytic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planning.cost_model import (
    FEATURES,
    StepCostModel,
    StepRecords,
    coefficients,
    extrapolate_tp,
    fit_step_model,
    nnls,
    predict,
    relative_errors,
)
from planning.profile import (
    A100_80GB,
    CALIB_STEP_TERMS,
    AnalyticCalib,
    CalibrationSample,
    ModelArch,
    ModelProfile,
    ProfileRun,
    ProfileSet,
    UnknownModelError,
    analytic_profile,
    calibrate_analytic,
    estimate_activation_bytes,
    fit_activation,
)

TRUE = StepCostModel(
    c_const=0.012, c_tokens=3e-5, c_knee=4e-5, c_seqs=2e-5, c_context=2e-7, c_attn=3e-10,
    knee_tokens=256.0,
)  # fmt: skip
LLAMA13B = ModelArch(
    layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824, vocab=32000,
    mlp="gated", num_experts=1, experts_per_tok=1, dtype_bytes=2, max_model_len=4096,
)  # fmt: skip
CALIB = AnalyticCalib(
    step=(0.005, 0.0, 7e-5, 0.9, 1.1, 30.0, 0.25, 1.3e-5, 9.0, 0.7, 0.4, 1.4),
    knee_ridge_mult=0.5, load_base_s=5.0, load_per_extra_gpu_s=12.0, load_s_per_byte=3.4e-10,
)  # fmt: skip


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20250321)


def synthetic_records(rng: np.random.Generator, n: int = 600) -> StepRecords:
    """Legacy-convention prefill and decode steps spanning both sides of the knee."""
    half = n // 2
    b = rng.integers(1, 256, half).astype(float)
    s = rng.integers(1, 64, half).astype(float)
    db = rng.integers(1, 512, n - half).astype(float)
    ctx = db * rng.integers(1, 2048, n - half)
    pre = np.concatenate([b * s, np.zeros(n - half)])
    dec = np.concatenate([np.zeros(half), db])
    seqs = np.concatenate([b, db])
    context = np.concatenate([b * s, ctx])
    attn = np.concatenate([b * s * s, np.zeros(n - half)])
    base = StepRecords(pre, dec, seqs, context, attn, np.ones(n))
    return StepRecords(pre, dec, seqs, context, attn, predict(TRUE, base))


def test_fit_recovers_known_coefficients(rng: np.random.Generator) -> None:
    records = synthetic_records(rng)
    fit = fit_step_model(records, knee_grid=[64.0, 128.0, 256.0, 512.0])
    assert fit.model.knee_tokens == 256.0
    assert fit.mape < 1e-6 and fit.n == len(records)
    np.testing.assert_allclose(coefficients(fit.model), coefficients(TRUE), rtol=1e-4)


def test_fit_with_noise_is_close(rng: np.random.Generator) -> None:
    clean = synthetic_records(rng, 2000)
    noisy = StepRecords(
        clean.prefill_tokens, clean.decode_seqs, clean.num_seqs, clean.context_tokens,
        clean.attn_pairs, clean.latency_s * rng.lognormal(0.0, 0.03, len(clean)),
    )  # fmt: skip
    fit = fit_step_model(noisy)
    assert relative_errors(fit.model, clean).mean() < 0.02


def test_fit_rejects_bad_input(rng: np.random.Generator) -> None:
    records = synthetic_records(rng, 20)
    with pytest.raises(ValueError, match="knee_grid"):
        fit_step_model(records, knee_grid=[])
    with pytest.raises(ValueError, match="need >= 6"):
        fit_step_model(records.take(np.arange(3)))
    zero = StepRecords(*(np.zeros(10) for _ in range(6)))
    with pytest.raises(ValueError, match="latency_s"):
        fit_step_model(zero)


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [("context_tokens", np.nan, "non-finite"), ("attn_pairs", -1.0, "negative")],
)
def test_step_records_validation_names_field(field: str, bad: float, match: str) -> None:
    cols = {name: np.ones(4) for name in
            ("prefill_tokens", "decode_seqs", "num_seqs", "context_tokens", "attn_pairs",
             "latency_s")}  # fmt: skip
    cols[field][2] = bad
    with pytest.raises(ValueError, match=f"{field}.*{match}"):
        StepRecords(**cols)
    cols[field] = np.ones(3)
    with pytest.raises(ValueError, match=f"{field}.*length"):
        StepRecords(**cols)


def test_predict_matches_step_latency(rng: np.random.Generator) -> None:
    records = synthetic_records(rng, 50)
    expected = [
        TRUE.step_latency(int(p), int(d), int(s), int(k), float(a))
        for p, d, s, k, a in zip(records.prefill_tokens, records.decode_seqs, records.num_seqs,
                                 records.context_tokens, records.attn_pairs, strict=True)
    ]  # fmt: skip
    np.testing.assert_allclose(predict(TRUE, records), expected, rtol=1e-12)
    assert len(FEATURES) == 6


@given(
    seqs=st.integers(1, 512), ctx=st.integers(0, 10**6), steps=st.integers(0, 300),
    knee=st.sampled_from([0.0, 64.0, 4096.0]),
)  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_decode_run_latency_equals_summed_steps(
    seqs: int, ctx: int, steps: int, knee: float
) -> None:
    model = StepCostModel(0.01, 3e-5, 4e-5, 2e-5, 2e-7, 3e-10, knee)
    summed = sum(model.step_latency(0, seqs, seqs, ctx + i * seqs, 0.0) for i in range(steps))
    assert model.decode_run_latency(seqs, ctx, steps) == pytest.approx(summed, rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 10_000), m=st.integers(1, 40), n=st.integers(1, 8))
@settings(max_examples=80, deadline=None)
def test_nnls_non_negative_and_kkt(seed: int, m: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, n))
    b = rng.normal(size=m)
    x = nnls(a, b)
    assert np.all(x >= 0)
    grad = a.T @ (b - a @ x)  # KKT: grad <= 0 everywhere, == 0 where x > 0
    scale = 1e-7 * (1 + np.abs(a).sum() * (1 + np.abs(b).sum()))
    assert np.all(grad <= scale)
    assert np.all(np.abs(grad[x > 0]) <= scale)


def test_nnls_matches_unconstrained_when_feasible(rng: np.random.Generator) -> None:
    a = rng.random((200, 5))
    truth = np.array([1.0, 2.0, 0.5, 3.0, 0.1])
    np.testing.assert_allclose(nnls(a, a @ truth), truth, rtol=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        nnls(a, np.ones(3))


def test_extrapolate_tp_power_law() -> None:
    # Latencies exactly proportional to 1/tp extrapolate (and interpolate) exactly.
    fits = {tp: StepCostModel(*(coefficients(TRUE) / tp), knee_tokens=256.0) for tp in (1, 2)}
    four = extrapolate_tp(fits, 4)
    probe = synthetic_records(np.random.default_rng(1), 200)
    np.testing.assert_allclose(predict(four, probe), predict(TRUE, probe) / 4, rtol=0.02)
    with pytest.raises(ValueError, match="2 fitted tps"):
        extrapolate_tp({1: TRUE}, 4)


def make_profile(weights: int = 26_031_728_640, kv: int = 819_200) -> ModelProfile:
    return ModelProfile(
        model="m", tp=1, gpu=A100_80GB.name, step=TRUE, load_time_s=14.0,
        weight_bytes_per_gpu=weights, kv_bytes_per_token_per_gpu=kv, max_model_len=4096,
        source="measured", fit_mape=0.05,
    )  # fmt: skip


def test_kv_capacity_blocks() -> None:
    p = make_profile()
    # (84,986,691,584 x 0.9 - 26,031,728,640) / (819,200 x 16) = 3849.5 (vLLM logged 3727).
    assert p.kv_capacity_blocks(A100_80GB.memory_bytes) == 3849
    assert p.kv_capacity_blocks(A100_80GB.memory_bytes, activation_bytes=1_600_000_000) == 3727
    assert p.kv_capacity_blocks(A100_80GB.memory_bytes, block_size=32) == 1924
    with pytest.raises(ValueError, match="do not fit"):
        make_profile(weights=80_000_000_000).kv_capacity_blocks(A100_80GB.memory_bytes)


def test_arch_memory_matches_logged_vicuna() -> None:
    # Logged: 26,031,728,640 B weights at tp1; 819,200 / 409,600 / 204,800 B KV per token.
    assert LLAMA13B.weight_bytes_per_gpu(1) == pytest.approx(26_031_728_640, rel=1e-3)
    assert [LLAMA13B.kv_bytes_per_token_per_gpu(tp) for tp in (1, 2, 4)] == [
        819_200, 409_600, 204_800,
    ]  # fmt: skip
    glm = ModelArch(28, 4096, 32, 2, 13696, 65024, "gated", 1, 1, 2, 8192)
    assert glm.kv_bytes_per_token_per_gpu(4) == glm.kv_bytes_per_token_per_gpu(2) == 14_336


def test_analytic_profile_is_sane() -> None:
    p = analytic_profile(LLAMA13B, 1, A100_80GB, CALIB, model="x")
    assert p.source == "analytic" and p.fit_mape is None and p.max_model_len == 4096
    lat = p.step.step_latency
    assert 0.01 < lat(0, 1, 1, 100, 0.0) < 0.05  # one decode ~ weights / bandwidth
    assert lat(0, 64, 64, 64 * 1000, 0.0) > lat(0, 64, 64, 64 * 10, 0.0)  # grows with context
    assert lat(4096, 0, 1, 4096, 4096.0**2) > lat(1024, 0, 1, 1024, 1024.0**2)  # with tokens
    assert lat(0, 256, 256, 256, 0.0) > lat(0, 8, 8, 8, 0.0)
    faster = analytic_profile(LLAMA13B, 2, A100_80GB, CALIB)
    assert faster.step.step_latency(4096, 0, 1, 4096, 4096.0**2) < lat(4096, 0, 1, 4096, 4096.0**2)
    assert faster.load_time_s > p.load_time_s > 0


def test_calibrate_analytic_recovers_its_own_model() -> None:
    rng = np.random.default_rng(3)
    samples, loads = [], []
    for tp in (1, 2, 4):
        truth = analytic_profile(LLAMA13B, tp, A100_80GB, CALIB).step
        base = synthetic_records(rng, 300)
        samples.append(CalibrationSample(LLAMA13B, tp, StepRecords(
            base.prefill_tokens, base.decode_seqs, base.num_seqs, base.context_tokens,
            base.attn_pairs, predict(truth, base))))  # fmt: skip
        loads.append((LLAMA13B, tp, 5.0 + 12.0 * (tp - 1) + 3.4e-10 * 26e9))
    calib = calibrate_analytic(samples, loads, A100_80GB, knee_mults=(0.5, 1.0))
    assert len(calib.step) == len(CALIB_STEP_TERMS) and calib.knee_ridge_mult == 0.5
    for s in samples:
        step = analytic_profile(LLAMA13B, s.tp, A100_80GB, calib).step
        assert relative_errors(step, s.records).mean() < 0.01


def test_profile_set_resolution() -> None:
    measured = make_profile()
    ps = ProfileSet(A100_80GB, {("m", 1): measured}, {"arch-only": LLAMA13B}, CALIB)
    assert ps.get("m", 1) is measured
    assert ps.get("arch-only", 2).source == "analytic"
    twin = ps.resolve("new", 1, arch=LLAMA13B, twin="m")
    assert twin.source == "twin:m" and twin.step == measured.step and twin.model == "new"
    assert ps.resolve("new", 2, arch=LLAMA13B, twin="m").source == "analytic"
    with pytest.raises(UnknownModelError, match="nobody/none") as info:
        ps.get("nobody/none", 1)
    assert isinstance(info.value, KeyError) and "nobody/none" in str(info.value)
    with pytest.raises(UnknownModelError, match="stored tps: tp1"):
        ProfileSet(A100_80GB, {("m", 1): measured}).get("m", 8)


# --------------------------------------------------------------------------------------------
# Activation memory and tp divisibility.
# --------------------------------------------------------------------------------------------

# lmsys/vicuna-13b-v1.5 tp1 in a100_vllm030_profile_runs.csv: vLLM logged 3,727 blocks.
VICUNA_RUN = ProfileRun(84_986_691_584, 0.9, 27_626_504_192, 3727, 13_107_200, 16)


def test_kv_capacity_uses_profile_activation() -> None:
    act = VICUNA_RUN.activation_bytes(26_031_728_640)
    assert act == 27_626_504_192 - 26_031_728_640  # profiled peak - weights
    p = ModelProfile(
        model="m", tp=1, gpu=A100_80GB.name, step=TRUE, load_time_s=14.0,
        weight_bytes_per_gpu=26_031_728_640, kv_bytes_per_token_per_gpu=819_200,
        max_model_len=4096, source="measured", fit_mape=0.05, activation_bytes_per_gpu=act,
    )  # fmt: skip
    assert p.kv_capacity_blocks(A100_80GB.memory_bytes, 0.9) == 3727  # vLLM's number
    assert p.kv_capacity_blocks(A100_80GB.memory_bytes, activation_bytes=0) == 3849
    with pytest.raises(ValueError, match="activation"):
        make_profile(weights=75_000_000_000).kv_capacity_blocks(
            A100_80GB.memory_bytes, activation_bytes=2_000_000_000
        )
    with pytest.raises(ValueError, match="negative activation"):
        ModelProfile("m", 1, A100_80GB.name, TRUE, 1.0, 1, 1, 16, "measured", None, -1)


def test_profile_run_activation_when_another_worker_peaked_higher() -> None:
    # NousResearch/Llama-2-13b-hf tp4: the driver's peak implies 20,354 blocks, vLLM kept
    # 20,027 (the minimum over its 4 workers); the activation must reproduce 20,027.
    run = ProfileRun(84_986_691_584, 0.9, 9_790_226_432, 20_027, 3_276_800, 16)
    act = run.activation_bytes(6_508_554_240)
    assert act > 9_790_226_432 - 6_508_554_240
    free = 84_986_691_584 * 0.9 - 6_508_554_240 - act
    assert int(free // 3_276_800) == 20_027


def test_activation_model_fit_and_analytic_estimate() -> None:
    truth = (6e8, 5e8, 3e8, 3.0, 8.0)
    archs = [LLAMA13B, ModelArch(32, 4096, 32, 32, 11008, 64000, "gated", 1, 1, 2, 2048),
             ModelArch(44, 6144, 64, 64, 24576, 50432, "plain", 1, 1, 2, 8192)]  # fmt: skip
    samples = [(a, tp, estimate_activation_bytes(a, tp, truth)) for a in archs for tp in (1, 2, 4)]
    fitted = fit_activation(samples)
    for a, tp, b in samples:
        assert estimate_activation_bytes(a, tp, fitted) == pytest.approx(b, rel=1e-6)
    calib = AnalyticCalib(CALIB.step, 0.5, 5.0, 12.0, 3.4e-10, activation=fitted)
    p = analytic_profile(LLAMA13B, 2, A100_80GB, calib)
    assert p.activation_bytes_per_gpu == pytest.approx(samples[1][2], rel=1e-6)
    assert analytic_profile(LLAMA13B, 2, A100_80GB, CALIB).activation_bytes_per_gpu == 0
    with pytest.raises(ValueError, match="activation"):
        AnalyticCalib(CALIB.step, 0.5, 5.0, 12.0, 3.4e-10, activation=(1.0,))
    with pytest.raises(ValueError, match="need"):
        fit_activation(samples[:2])


def test_tp_must_divide_attention_heads() -> None:
    with pytest.raises(ValueError, match=r"lmsys/vicuna-13b-v1.5: tp=3 .* 40 attention heads"):
        analytic_profile(LLAMA13B, 3, A100_80GB, CALIB, model="lmsys/vicuna-13b-v1.5")
    with pytest.raises(ValueError, match="tp=3 does not divide its 40 attention heads"):
        LLAMA13B.kv_heads_per_gpu(3)
    with pytest.raises(ValueError, match="tp=3"):
        LLAMA13B.weight_bytes_per_gpu(3)
    gqa = ModelArch(80, 8192, 64, 8, 28672, 32000, "gated", 1, 1, 2, 4096)
    assert gqa.kv_heads_per_gpu(16) == 1  # 16 is a multiple of 8 KV heads: replicated
    with pytest.raises(ValueError, match="12 KV heads"):
        ModelArch(4, 768, 48, 12, 3072, 1000, "gated", 1, 1, 2, 512).check_tp(8, "x")
    ps = ProfileSet(A100_80GB, {}, {"lmsys/vicuna-13b-v1.5": LLAMA13B}, CALIB)
    with pytest.raises(ValueError, match="vicuna-13b-v1.5: tp=3") as info:
        ps.resolve("lmsys/vicuna-13b-v1.5", 3)
    assert not isinstance(info.value, UnknownModelError)
    with pytest.raises(ValueError, match="tp=3"):
        ps.resolve("new", 3, arch=LLAMA13B)
    assert ps.resolve("lmsys/vicuna-13b-v1.5", 4).tp == 4


def test_nnls_inner_terminates_when_the_step_underflows() -> None:
    # x[1] is subnormal and z[1] very negative: the step alpha rounds to 0, which used to spin
    # forever; the blocking coordinate must leave the passive set.
    from planning.cost_model import _nnls_inner

    a = np.eye(2)
    b = np.array([1.0, -10.0])
    x = np.array([1.0, 5e-324])
    z, passive = _nnls_inner(a, b, x, np.array([True, True]))
    assert list(passive) == [True, False]
    np.testing.assert_allclose(z, [1.0, 0.0])
