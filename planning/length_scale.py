"""How much longer (or shorter) a model's outputs run than its length distribution says, from
what a running job has seen so far (pure: numpy only).

The model of the error is a stretch: true length = s x believed length. :func:`stretched` builds
the believed pmf stretched by ``s`` (each bin's mass spread evenly over its stretched interval,
so no length gets zero probability by rounding). :func:`fit_length_scale` is the maximum
likelihood ``s`` on a log grid given finished requests (exact lengths) and censored ones
(requests still running at g tokens, or stopped by their cap: the truth is beyond g), the
standard treatment of right-censored data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from planning.length_dist import LengthDistribution

FloatArray = NDArray[np.float64]
GRID = np.exp(np.linspace(np.log(0.2), np.log(5.0), 129))  # candidate scales, x
_FLOOR = 1e-12  # probability floor inside logs


@dataclass(frozen=True, slots=True)
class LengthScaleFit:
    """The fitted stretch and how much data it rests on."""

    scale: float  # x; true length / believed length
    finished: int  # exact lengths used
    censored: int  # lower bounds used
    log_width: float  # width of the 0.5-log-likelihood interval on log s (0: within one grid step)


def _stretched_cdf(pmf: FloatArray, scale: float, top: int) -> FloatArray:
    """CDF at 0.5, 1.5, ..., top + 0.5 tokens of the pmf stretched by ``scale``."""
    edges = np.arange(0, pmf.size + 1, dtype=np.float64) + 0.5  # bin l spans [l-0.5, l+0.5)
    cum = np.concatenate([[0.0], np.cumsum(pmf)])
    points = (np.arange(0, top + 1, dtype=np.float64) + 0.5) / scale
    out: FloatArray = np.interp(points, edges, cum, left=0.0, right=1.0)
    return out


def stretched(dist: LengthDistribution, scale: float) -> LengthDistribution:
    """``dist`` with every length multiplied by ``scale`` (pooled pmf; buckets dropped)."""
    if scale == 1.0:
        return dist
    top = max(1, int(np.ceil(dist.max_len * scale)))
    cdf = _stretched_cdf(dist.pmf, scale, top)
    pmf = np.diff(cdf)
    pmf[0] += cdf[0]  # below one token: the shortest length
    pmf[-1] += 1.0 - cdf[-1]
    return LengthDistribution.from_pmf(np.maximum(pmf, 0.0), atol=1e-6)


def fit_length_scale(
    dist: LengthDistribution,
    finished: ArrayLike,
    censored: ArrayLike,
    *,
    finished_prompts: ArrayLike | None = None,
    censored_prompts: ArrayLike | None = None,
) -> LengthScaleFit:
    """Maximum-likelihood stretch over :data:`GRID` (1.0 when there are no observations).

    Args:
        dist: the believed distribution.
        finished: exact output lengths (tokens) of requests that stopped on their own.
        censored: lower bounds (tokens): the true length is larger.
        finished_prompts, censored_prompts: prompt tokens of each, selecting the pmf of its
            prompt-length bucket when ``dist`` has buckets (pooled pmf otherwise).
    """
    x = np.asarray(finished, dtype=np.int64)
    g = np.asarray(censored, dtype=np.int64)
    if x.size + g.size == 0:
        return LengthScaleFit(1.0, 0, 0, float("inf"))
    groups = _by_pmf(dist, x, finished_prompts, g, censored_prompts)
    top = int(max(x.max(initial=1), g.max(initial=1))) + 1
    ll = np.array([sum(_loglik(pmf, s, xs, gs, top) for pmf, xs, gs in groups) for s in GRID])
    best = int(np.argmax(ll))
    inside = np.log(GRID[ll >= ll[best] - 0.5])
    return LengthScaleFit(float(GRID[best]), int(x.size), int(g.size),
                          float(inside.max() - inside.min()))  # fmt: skip


Group = tuple[FloatArray, NDArray[np.int64], NDArray[np.int64]]


def _by_pmf(
    dist: LengthDistribution, x: NDArray[np.int64], xp: ArrayLike | None,
    g: NDArray[np.int64], gp: ArrayLike | None,
) -> list[Group]:  # fmt: skip
    """Observations grouped by the pmf that applies to them (one group without buckets)."""
    if not dist.has_buckets or xp is None or gp is None:
        return [(dist.pmf, x, g)]
    xb = [id(dist.pmf_for(int(p))) for p in np.asarray(xp, dtype=np.int64)]
    gb = [id(dist.pmf_for(int(p))) for p in np.asarray(gp, dtype=np.int64)]
    pmfs = {id(p): p for p in (dist.pmf, *dist.bucket_pmfs)}
    return [
        (pmfs[k], x[np.array([b == k for b in xb], dtype=bool)],
         g[np.array([b == k for b in gb], dtype=bool)])
        for k in sorted(set(xb) | set(gb))
    ]  # fmt: skip


def _loglik(
    pmf: FloatArray, s: float, x: NDArray[np.int64], g: NDArray[np.int64], top: int
) -> float:
    cdf = _stretched_cdf(pmf, s, top)  # cdf[k] = P(L <= k + 0.5)
    mass = np.diff(cdf)  # mass[k] = P(L = k + 1)
    exact = np.log(np.maximum(mass[np.clip(x - 1, 0, top - 1)], _FLOOR)).sum()
    beyond = np.log(np.maximum(1.0 - cdf[np.clip(g, 0, top)], _FLOOR)).sum()
    return float(exact + beyond)
