"""The length stretch: a stretched pmf, and its maximum-likelihood fit from censored data."""

from __future__ import annotations

import numpy as np
import pytest

from planning.length_dist import LengthDistribution
from planning.length_scale import fit_length_scale, stretched


def _belief() -> LengthDistribution:
    lengths = np.arange(1, 401)
    pmf = np.exp(-((lengths - 120.0) ** 2) / (2 * 50.0**2)) + 0.002
    return LengthDistribution.from_pmf(pmf / pmf.sum())


def test_stretched_moves_the_mean_and_keeps_mass() -> None:
    d = _belief()
    for s in (0.5, 1.0, 2.0, 3.3):
        got = stretched(d, s)
        assert got.pmf.sum() == pytest.approx(1.0)
        assert got.mean() == pytest.approx(s * d.mean(), rel=0.02)
    assert stretched(d, 1.0) is d


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.0])
def test_fit_recovers_the_stretch_with_censoring(truth: float) -> None:
    """Exact lengths below a cap, censored at the cap and at running requests' progress."""
    rng = np.random.default_rng(7)
    d = _belief()
    true = stretched(d, truth).sample(rng, 300)
    cap = 256
    running = rng.integers(1, 60, size=100)  # 100 still running, g tokens so far
    run_true = stretched(d, truth).sample_conditional(rng, running)
    assert (run_true > running).all()
    fit = fit_length_scale(
        d, true[true < cap], np.concatenate([np.full((true >= cap).sum(), cap - 1), running])
    )
    assert fit.scale == pytest.approx(truth, rel=0.08)
    assert fit.finished == int((true < cap).sum()) and 0 <= fit.log_width < 0.2


def test_no_observations_means_no_stretch() -> None:
    fit = fit_length_scale(_belief(), [], [])
    assert fit.scale == 1.0 and fit.finished == fit.censored == 0
