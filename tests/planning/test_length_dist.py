"""Tests for planning.length_dist: estimators under censoring, sampling, buckets, serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from planning.length_dist import (
    FORMAT_TAG,
    LengthDistribution,
    LengthFormatError,
    LengthObservations,
)

SMALL_PMF = np.array([0.1, 0.0, 0.2, 0.3, 0.0, 0.4, 0.0, 0.0])  # lengths 1..8, zeros included


def censored_sample(
    rng: np.random.Generator, natural: np.ndarray, capped_share: float, cap_range: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_len, output_len, finished): a share of requests is cut at a random cap."""
    n = natural.size
    cap = np.full(n, 10**9)
    capped = rng.random(n) < capped_share
    cap[capped] = rng.integers(cap_range[0], cap_range[1] + 1, int(capped.sum()))
    return rng.integers(0, 1000, n), np.minimum(natural, cap), natural <= cap


def geometric(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    return rng.geometric(1.0 / mean, n).astype(np.int64)


def lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.maximum(1, np.ceil(np.exp(rng.normal(math.log(200), 0.8, n)))).astype(np.int64)


# ------------------------------------------------------------------ estimators
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_km_mean_is_unbiased_under_heavy_censoring_geometric(seed: int) -> None:
    rng = np.random.default_rng(seed)
    natural = geometric(rng, 20_000, mean=300.0)
    p, o, f = censored_sample(rng, natural, capped_share=0.8, cap_range=(8, 400))
    assert 1 - f.mean() > 0.35  # a large fraction is censored
    km = LengthDistribution.from_observations(p, o, f)
    assert km.mean() == pytest.approx(300.0, rel=0.04)
    assert o.mean() < 0.75 * 300.0  # the naive mean is clearly biased low


def test_km_mean_is_unbiased_under_heavy_censoring_lognormal() -> None:
    rng = np.random.default_rng(7)
    truth = float(np.minimum(lognormal(np.random.default_rng(99), 2_000_000), 5000).mean())
    p, o, f = censored_sample(rng, lognormal(rng, 20_000), capped_share=0.7, cap_range=(16, 300))
    assert 1 - f.mean() > 0.3
    km = LengthDistribution.from_observations(p, o, f, max_len=5000)
    assert km.mean() == pytest.approx(truth, rel=0.04)
    assert o.mean() < 0.8 * truth


def test_km_without_censoring_is_the_empirical_pmf() -> None:
    o = np.array([1, 3, 3, 4, 6, 6, 6, 2])
    km = LengthDistribution.from_observations(np.zeros(8, int), o, np.ones(8, bool))
    expected = np.bincount(o, minlength=7)[1:] / o.size
    np.testing.assert_allclose(km.pmf, expected, atol=1e-15)


def test_km_survival_beyond_largest_observation_goes_to_last_bin() -> None:
    o = np.array([1, 5])
    km = LengthDistribution.from_observations(np.zeros(2, int), o, np.array([True, False]))
    np.testing.assert_allclose(km.pmf, [0.5, 0, 0, 0, 0.5])
    wide = LengthDistribution.from_observations(
        np.zeros(2, int), o, np.array([True, False]), max_len=9
    )
    assert wide.max_len == 9 and wide.pmf[-1] == pytest.approx(0.5)
    narrow = LengthDistribution.from_observations(np.zeros(2, int), o, np.ones(2, bool), max_len=3)
    np.testing.assert_allclose(narrow.pmf, [0.5, 0, 0.5])  # lengths above max_len clipped


def test_authors_estimator_matches_km_with_context_censoring_only() -> None:
    rng = np.random.default_rng(3)
    natural = geometric(rng, 20_000, mean=300.0)
    prompt = rng.integers(4, 1900, natural.size)
    cap = 2048 - prompt
    o, f = np.minimum(natural, cap), natural <= cap
    km = LengthDistribution.from_observations(prompt, o, f, max_len=2048)
    au = LengthDistribution.from_authors_estimator(prompt, o, f, context_len=2048)
    assert au.max_len == 2048
    assert au.mean() == pytest.approx(km.mean(), rel=0.03)
    assert km.mean() == pytest.approx(300.0, rel=0.04)


def test_authors_estimator_is_biased_by_max_tokens_censoring() -> None:
    rng = np.random.default_rng(4)
    natural = geometric(rng, 20_000, mean=300.0)
    prompt, o, f = censored_sample(rng, natural, capped_share=0.5, cap_range=(16, 400))
    prompt = np.minimum(prompt, 1000)
    km = LengthDistribution.from_observations(prompt, o, f, max_len=2048)
    au = LengthDistribution.from_authors_estimator(prompt, o, f, context_len=2048)
    assert km.mean() == pytest.approx(300.0, rel=0.04)
    assert au.mean() > 1.2 * 300.0  # missing per-length mass piles into the last bin


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("pmf", "match"),
    [
        ([], "non-empty"),
        ([[0.5, 0.5]], "1-D"),
        ([0.5, float("nan")], "non-finite"),
        ([0.5, float("inf")], "non-finite"),
        ([1.5, -0.5], "negative"),
        ([0.0, 0.0], "positive sum"),
        ([0.5, 0.4], "sums to"),
    ],
)
def test_from_pmf_rejects_bad_input(pmf: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LengthDistribution.from_pmf(pmf)


def test_from_pmf_renormalises_within_tolerance_and_accepts_counts_with_inf_atol() -> None:
    dist = LengthDistribution.from_pmf([0.25, 0.75 + 1e-8])
    assert dist.pmf.sum() == pytest.approx(1.0, abs=1e-15)
    counts = LengthDistribution.from_pmf([1, 3], atol=math.inf)
    np.testing.assert_allclose(counts.pmf, [0.25, 0.75])
    with pytest.raises(ValueError):
        dist.pmf[0] = 0.5  # read-only


def test_observation_validation() -> None:
    with pytest.raises(ValueError, match="output_len >= 1"):
        LengthDistribution.from_observations([0], [0], [True])
    with pytest.raises(ValueError, match="boolean"):
        LengthDistribution.from_observations([0], [3], [1])
    with pytest.raises(ValueError, match="equal-length"):
        LengthObservations(np.array([1, 2]), np.array([3]), np.array([True]))
    obs = LengthObservations(
        np.array([1, 2, 3]), np.array([4, 5, 6]), np.ones(3, bool), ("a", "b", "a")
    )
    split = obs.by_model()
    assert list(split) == ["a", "b"] and split["a"].output_len.tolist() == [4, 6]


# ------------------------------------------------------------------ summaries
def test_mean_quantile_cdf() -> None:
    dist = LengthDistribution.from_pmf(SMALL_PMF)
    assert dist.mean() == pytest.approx(0.1 * 1 + 0.2 * 3 + 0.3 * 4 + 0.4 * 6)
    assert dist.quantile(0.0) == 1 and dist.quantile(1.0) == 6
    assert dist.quantile(0.25) == 3 and dist.quantile(0.31) == 4
    np.testing.assert_array_equal(dist.quantile(np.array([0.05, 0.5, 0.61])), [1, 4, 6])
    cdf = dist.cdf()
    assert cdf[-1] == 1.0 and cdf[5] == 1.0 and np.all(np.diff(cdf) >= 0)
    with pytest.raises(ValueError):
        dist.quantile(1.5)


# ------------------------------------------------------------------ sampling
def test_sample_is_exact_inverse_cdf_of_one_uniform_per_draw() -> None:
    dist = LengthDistribution.from_pmf(SMALL_PMF)
    draws = dist.sample(np.random.default_rng(5), 100_000)
    u = np.random.default_rng(5).random(100_000)
    np.testing.assert_array_equal(draws, np.searchsorted(dist.cdf(), u, side="right") + 1)
    freq = np.bincount(draws, minlength=9)[1:] / draws.size
    np.testing.assert_allclose(freq, SMALL_PMF, atol=0.005)
    assert draws.dtype == np.int64


@settings(max_examples=60, deadline=None)
@given(
    weights=hnp.arrays(
        np.float64, st.integers(1, 300), elements=st.sampled_from([0.0, 1e-9, 0.5, 3.0])
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_matches_searchsorted_reference(weights: np.ndarray, seed: int) -> None:
    if weights.sum() == 0:
        weights[-1] = 1.0
    dist = LengthDistribution.from_pmf(weights, atol=math.inf)
    draws = dist.sample(np.random.default_rng(seed), 2000)
    u = np.random.default_rng(seed).random(2000)
    np.testing.assert_array_equal(draws, np.searchsorted(dist.cdf(), u, side="right") + 1)
    assert np.all(dist.pmf[draws - 1] > 0)  # never a zero-mass length


def test_sample_is_deterministic_per_seed() -> None:
    dist = LengthDistribution.from_pmf(SMALL_PMF)
    a = dist.sample(np.random.default_rng(11), 500)
    b = dist.sample(np.random.default_rng(11), 500)
    c = dist.sample(np.random.default_rng(12), 500)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g = np.arange(500) % 7
    np.testing.assert_array_equal(
        dist.sample_conditional(np.random.default_rng(3), g),
        dist.sample_conditional(np.random.default_rng(3), g),
    )


caps = st.one_of(st.integers(-3, 12), hnp.arrays(np.int64, 50, elements=st.integers(-3, 12)))


@settings(max_examples=100, deadline=None)
@given(max_tokens=st.none() | caps, context_left=st.none() | caps, seed=st.integers(0, 10**6))
def test_samples_respect_caps(
    max_tokens: int | np.ndarray | None, context_left: int | np.ndarray | None, seed: int
) -> None:
    dist = LengthDistribution.from_pmf(SMALL_PMF)
    out = dist.sample(
        np.random.default_rng(seed), 50, max_tokens=max_tokens, context_left=context_left
    )
    bound = np.full(50, 8)
    for cap in (max_tokens, context_left):
        if cap is not None:
            bound = np.minimum(bound, cap)
    assert out.shape == (50,)
    assert np.all(out >= 1) and np.all(out <= np.maximum(bound, 1))


@settings(max_examples=150, deadline=None)
@given(
    generated=hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 12)),
    max_tokens=st.none() | st.integers(-2, 12),
    context_left=st.none() | st.integers(-2, 12),
    seed=st.integers(0, 10**6),
)
def test_conditional_never_below_generated(
    generated: np.ndarray, max_tokens: int | None, context_left: int | None, seed: int
) -> None:
    dist = LengthDistribution.from_pmf(SMALL_PMF)
    rng = np.random.default_rng(seed)
    out = dist.sample_conditional(rng, generated, max_tokens=max_tokens, context_left=context_left)
    assert np.all(out >= generated) and np.all(out >= 1)
    cap = min(c for c in (max_tokens, context_left, 10**9) if c is not None)
    assert np.all(out <= np.maximum(generated, max(cap, 1)))
    if max_tokens is None and context_left is None:
        assert np.all(out > generated)
        assert np.all(dist.pmf[np.minimum(out, 8) - 1][generated < 6] > 0)
        np.testing.assert_array_equal(out[generated >= 6], generated[generated >= 6] + 1)


def test_conditional_draws_follow_the_tail_distribution() -> None:
    rng = np.random.default_rng(8)
    dist = LengthDistribution.from_observations(
        np.zeros(50_000, int), geometric(rng, 50_000, 200.0), np.ones(50_000, bool)
    )
    lengths = np.arange(1, dist.max_len + 1)
    tail = lengths > 150
    exact = float(np.dot(lengths[tail], dist.pmf[tail]) / dist.pmf[tail].sum())
    draws = dist.sample_conditional(rng, np.full(100_000, 150))
    assert draws.min() > 150
    assert draws.mean() == pytest.approx(exact, rel=0.01)
    scalar = dist.sample_conditional(rng, 150)
    assert scalar.shape == (1,) and scalar[0] > 150
    with pytest.raises(ValueError):
        dist.sample_conditional(rng, np.array([-1]))


# ------------------------------------------------------------------ buckets
def bucketed_observations(n_short: int, n_long: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(21)
    prompt = np.concatenate([rng.integers(1, 256, n_short), rng.integers(256, 2000, n_long)])
    output = np.concatenate([geometric(rng, n_short, 50.0), geometric(rng, n_long, 400.0)])
    return prompt, output, np.ones(prompt.size, bool)


def test_buckets_used_with_enough_data() -> None:
    p, o, f = bucketed_observations(3000, 3000)
    dist = LengthDistribution.from_observations(p, o, f, bucket_edges=[256])
    assert dist.has_buckets and dist.bucket_counts == (3000, 3000)
    assert dist.mean(prompt_len=10) == pytest.approx(50, rel=0.08)
    assert dist.mean(prompt_len=1000) == pytest.approx(400, rel=0.08)
    rng = np.random.default_rng(0)
    prompts = np.where(np.arange(20_000) % 2 == 0, 10, 1000)
    draws = dist.sample(rng, 20_000, prompt_len=prompts)
    assert draws[prompts == 10].mean() == pytest.approx(50, rel=0.08)
    assert draws[prompts == 1000].mean() == pytest.approx(400, rel=0.08)
    cond = dist.sample_conditional(rng, np.full(20_000, 60), prompt_len=prompts)
    assert cond[prompts == 10].mean() == pytest.approx(110, rel=0.1)
    pooled = dist.sample(rng, 20_000).mean()  # no prompt_len: pooled pmf
    assert pooled == pytest.approx(225, rel=0.08)


def test_buckets_fall_back_to_pooled_without_enough_data() -> None:
    p, o, f = bucketed_observations(3000, 150)
    dist = LengthDistribution.from_observations(p, o, f, bucket_edges=[256])
    assert dist.has_buckets and dist.bucket_counts == (3000, 150)
    np.testing.assert_array_equal(dist.bucket_pmfs[1], dist.pmf)
    assert not np.array_equal(dist.bucket_pmfs[0], dist.pmf)
    none = LengthDistribution.from_observations(p, o, f, bucket_edges=[256], min_bucket_count=5000)
    assert not none.has_buckets and none == LengthDistribution.from_observations(p, o, f)


def test_bad_bucket_edges() -> None:
    p, o, f = bucketed_observations(300, 300)
    with pytest.raises(ValueError, match="increasing"):
        LengthDistribution.from_observations(p, o, f, bucket_edges=[500, 256])


# ------------------------------------------------------------------ serialisation
@settings(max_examples=40, deadline=None)
@given(
    weights=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(0, 1e3)),
    tail_zeros=st.integers(0, 30),
)
def test_json_round_trip_is_exact(weights: np.ndarray, tail_zeros: int) -> None:
    if weights.sum() == 0:
        weights[0] = 1.0
    dist = LengthDistribution.from_pmf(
        np.concatenate([weights, np.zeros(tail_zeros)]), atol=math.inf
    )
    doc = json.loads(json.dumps(dist.to_dict()))
    assert doc["format"] == FORMAT_TAG and len(doc["pmf"]) <= weights.size
    back = LengthDistribution.from_dict(doc)
    assert back == dist and back.max_len == dist.max_len
    np.testing.assert_array_equal(back.pmf, dist.pmf)


def test_json_round_trip_with_buckets() -> None:
    p, o, f = bucketed_observations(3000, 150)
    dist = LengthDistribution.from_observations(p, o, f, bucket_edges=[256, 4000])
    back = LengthDistribution.from_dict(json.loads(json.dumps(dist.to_dict())))
    assert back == dist and back.bucket_counts == dist.bucket_counts
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(
        dist.sample(rng_a, 99, prompt_len=5), back.sample(rng_b, 99, prompt_len=5)
    )


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "<document>"),
        ({"format": "other/1", "max_len": 2, "pmf": [1.0]}, "format"),
        ({"format": FORMAT_TAG, "max_len": 0, "pmf": [1.0]}, "max_len"),
        ({"format": FORMAT_TAG, "max_len": 1, "pmf": [0.5, 0.5]}, "pmf"),
        ({"format": FORMAT_TAG, "max_len": 2, "pmf": [0.5, "x"]}, "pmf"),
        ({"format": FORMAT_TAG, "max_len": 2, "pmf": [0.5, 0.4]}, "pmf"),
        (
            {"format": FORMAT_TAG, "max_len": 2, "pmf": [1.0], "buckets": {"pmfs": 3}},
            "buckets.pmfs",
        ),
        (
            {
                "format": FORMAT_TAG,
                "max_len": 2,
                "pmf": [1.0],
                "buckets": {"edges": [5], "counts": [], "pmfs": [[1.0]]},
            },
            "buckets",
        ),
    ],
)
def test_from_dict_errors_name_the_field(doc: object, field: str) -> None:
    with pytest.raises(LengthFormatError) as info:
        LengthDistribution.from_dict(doc)
    assert info.value.field == field
