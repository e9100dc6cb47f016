"""Compare output-length estimators on synthetic censored data, and time sampling.

Natural lengths are a discretised lognormal (L = max(1, ceil(X)), ln X ~ N(ln 300, 1.0)),
truncated at M = 2048 like the authors' pdfs (last bin = P(L >= M)). Each request gets a prompt
of U{4..1900} tokens, so its context room is M - prompt_len; in scenario B half of the requests
also carry max_tokens ~ U{32..1024}. A request with L <= its cap finishes, otherwise it is cut
at the cap (censored). Estimators: naive (censored lengths taken as finished), Kaplan-Meier
(samullm) and the authors' event/risk estimator (method.md §2.2).

Usage: PYTHONPATH=. python3 bench/length_estimators.py [--seeds 20] [--n 10000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from planning.length_dist import LengthDistribution

CONTEXT = 2048  # tokens, M
MEDIAN, SIGMA = 300.0, 1.0  # lognormal parameters of the natural length (tokens, log-units)


def true_pmf() -> np.ndarray:
    """Exact pmf of min(L, M) over 1..M."""
    z = (np.log(np.arange(1, CONTEXT)) - math.log(MEDIAN)) / SIGMA  # at l = 1..M-1
    below = [0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z]  # P(L <= l) = P(X <= l)
    return np.diff(np.array([0.0, *below, 1.0]))


def synthetic(
    rng: np.random.Generator, n: int, max_tokens_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_len, output_len, finished) with context and optional max_tokens censoring."""
    natural = np.maximum(1, np.ceil(np.exp(rng.normal(math.log(MEDIAN), SIGMA, n)))).astype(int)
    prompt = rng.integers(4, 1901, n)
    cap = CONTEXT - prompt
    capped = rng.random(n) < max_tokens_share
    cap[capped] = np.minimum(cap[capped], rng.integers(32, 1025, int(capped.sum())))
    return prompt, np.minimum(natural, cap), natural <= cap


def summary(pmf: np.ndarray) -> dict[str, float]:
    cdf = np.cumsum(pmf)
    q = {f"p{int(p * 100)}": float(np.searchsorted(cdf, p) + 1) for p in (0.5, 0.9, 0.99)}
    return {"mean": float(np.dot(np.arange(1, pmf.size + 1), pmf)), **q, "last": float(pmf[-1])}


def naive_pmf(output_len: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.minimum(output_len, CONTEXT), minlength=CONTEXT + 1)[1:]
    return np.asarray(counts / counts.sum(), dtype=np.float64)


def scenario(name: str, share: float, seeds: int, n: int, truth: np.ndarray) -> None:
    rows: dict[str, list[dict[str, float]]] = {"naive": [], "kaplan-meier": [], "authors": []}
    censored = []
    for seed in range(seeds):
        p, o, f = synthetic(np.random.default_rng(seed), n, share)
        censored.append(1 - f.mean())
        km = LengthDistribution.from_observations(p, o, f, max_len=CONTEXT).pmf
        au = LengthDistribution.from_authors_estimator(p, o, f, context_len=CONTEXT).pmf
        for key, pmf in (("naive", naive_pmf(o)), ("kaplan-meier", km), ("authors", au)):
            rows[key].append(
                {**summary(pmf), "ks": float(np.abs(np.cumsum(pmf) - np.cumsum(truth)).max())}
            )
    print(f"\n{name}: censored {np.mean(censored):.1%} of requests ({seeds} seeds x {n})")
    print("| estimator | mean | P50 | P90 | P99 | last-bin mass | KS distance |")
    print("|---|---|---|---|---|---|---|")
    t = summary(truth)
    print(
        f"| truth | {t['mean']:.1f} | {t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} "
        f"| {t['last']:.4f} | 0 |"
    )
    for key, vals in rows.items():
        m = {k: np.mean([v[k] for v in vals]) for k in vals[0]}
        sd = np.std([v["mean"] for v in vals])
        print(
            f"| {key} | {m['mean']:.1f} ± {sd:.1f} | {m['p50']:.0f} | {m['p90']:.0f} "
            f"| {m['p99']:.0f} | {m['last']:.4f} | {m['ks']:.4f} |"
        )


def timing(truth: np.ndarray) -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    dists = {"synthetic M=2048": LengthDistribution.from_pmf(truth)}
    pdfs = shared / "output_length_pdfs.json"
    if pdfs.exists():
        from planning.io.lengths import load_authors_pdfs

        authors = load_authors_pdfs(pdfs)
        for key in ("vicuna-13b-v1.5", "dolly-v2-12b", "Mixtral-8x7B-Instruct-v0.1"):
            dists[key] = authors[key]
    rng = np.random.default_rng(0)
    g = rng.integers(0, 500, 10_000)
    print("\n| distribution | max_len | sample(10k) µs | sample_conditional(10k) µs |")
    print("|---|---|---|---|")
    for key, dist in dists.items():
        t1 = best_of(lambda d=dist: d.sample(rng, 10_000, max_tokens=4096))
        t2 = best_of(lambda d=dist: d.sample_conditional(rng, g, max_tokens=4096))
        print(f"| {key} | {dist.max_len} | {t1 * 1e6:.0f} | {t2 * 1e6:.0f} |")


def best_of(fn: object, repeats: int = 200) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args(argv)
    truth = true_pmf()
    scenario("A: context-limit censoring only", 0.0, args.seeds, args.n, truth)
    scenario("B: context limit + max_tokens on half", 0.5, args.seeds, args.n, truth)
    timing(truth)


if __name__ == "__main__":
    main(sys.argv[1:])
