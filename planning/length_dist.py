"""Output-length distributions: estimation from censored observations, and sampling.

A :class:`LengthDistribution` is a probability mass function over output lengths 1..max_len
tokens (``pmf[i]`` = P(L = i + 1)); the last bin holds all mass at or beyond ``max_len``. It can
carry one pmf per prompt-length bucket. It is built from

- a pmf (:meth:`LengthDistribution.from_pmf`, e.g. the authors' saved pdfs),
- observations with censoring (:meth:`LengthDistribution.from_observations`, Kaplan-Meier), or
- the authors' event/risk estimator (:meth:`LengthDistribution.from_authors_estimator`, method.md
  §2.2), kept for comparison.

Sampling is vectorised inverse-CDF with a guide table (O(1) expected per draw); conditional
sampling (method.md §11.2) draws L given L > g for requests that already produced g tokens.
Pure module: numpy only, every random function takes an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

FORMAT_TAG = "samullm.lengths/1"
_SUM_ATOL = 1e-9  # stored pmfs must sum to 1 within this (probability)
_ONE_MINUS = float(np.nextafter(1.0, 0.0))  # largest float below 1

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


class LengthFormatError(ValueError):
    """A ``samullm.lengths/1`` document is malformed; ``field`` names the offending key."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True, eq=False)
class LengthObservations:
    """Per-request output lengths as parallel arrays, some of them censored.

    A censored request (``finished`` false) was cut by ``max_tokens`` or the context limit: its
    natural length is known only to exceed ``output_len``.
    """

    prompt_len: IntArray  # tokens in each request's prompt (>= 0)
    output_len: IntArray  # tokens generated per request (>= 1)
    finished: NDArray[np.bool_]  # True: stopped by EOS/stop string; False: censored
    model: tuple[str, ...] | None = None  # model name per request; None if the source had none

    def __post_init__(self) -> None:
        p, o, f = _check_observations(self.prompt_len, self.output_len, self.finished)
        if self.model is not None and len(self.model) != p.size:
            raise ValueError(f"model has {len(self.model)} entries, expected {p.size}")
        for name, arr in (("prompt_len", p), ("output_len", o), ("finished", f)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def by_model(self) -> dict[str, LengthObservations]:
        """Split by model name; observations without a model column map to key ``""``."""
        if self.model is None:
            return {"": self}
        names = np.asarray(self.model, dtype=object)
        split: dict[str, LengthObservations] = {}
        for name in dict.fromkeys(self.model):
            mask = names == name
            split[name] = LengthObservations(
                self.prompt_len[mask], self.output_len[mask], self.finished[mask]
            )
        return split


@dataclass(frozen=True, slots=True)
class _InverseCdf:
    """Inverse-CDF lookup for one pmf: the CDF plus a guide table of power-of-two size."""

    cdf: FloatArray  # probability; cdf[i] = P(L <= i + 1), exactly 1.0 from the last mass on
    guide: NDArray[np.int32]  # bins; guide[j] = #{i : cdf[i] <= j / K}, clamped to `last`
    last: int  # bin index of the last positive-mass length
    first: int  # bin index of the first positive-mass length

    @classmethod
    def build(cls, pmf: FloatArray) -> _InverseCdf:
        positive = np.flatnonzero(pmf > 0)
        first, last = int(positive[0]), int(positive[-1])
        cdf = np.cumsum(pmf)
        cdf /= cdf[-1]
        cdf[last:] = 1.0  # NOTE(lengths): no draw may land in trailing zero-mass bins
        # NOTE(lengths): K = a power of two >= 4 * max_len, so u * K and j / K are exact and
        # almost every draw resolves in one comparison (~4x fewer fallbacks than K = max_len).
        size = 4 << int(pmf.size - 1).bit_length()
        grid = np.arange(size + 1, dtype=np.float64) / size
        guide = np.minimum(np.searchsorted(cdf, grid, side="right"), last).astype(np.int32)
        for arr in (cdf, guide):
            arr.setflags(write=False)
        return cls(cdf, guide, last, first)

    def invert(self, u: FloatArray) -> IntArray:
        """Lengths (tokens) for uniforms ``u`` in [0, 1): first i with cdf[i] > u, plus 1."""
        u = np.minimum(u, _ONE_MINUS)
        j = (u * (self.guide.size - 1)).astype(np.intp)
        lo, hi = self.guide[j], self.guide[j + 1]
        idx = lo.copy()
        above = self.cdf[lo] <= u
        idx[above] = hi[above]
        far = above & (hi - lo > 1)
        if far.any():
            idx[far] = np.searchsorted(self.cdf, u[far], side="right")
        return np.minimum(idx, self.last).astype(np.int64) + 1

    def cdf_at(self, lengths: IntArray) -> FloatArray:
        """P(L <= lengths) elementwise; 0 for lengths <= 0."""
        at = self.cdf[np.clip(lengths - 1, 0, self.cdf.size - 1)]
        return np.where(lengths > 0, at, 0.0)


@dataclass(frozen=True, slots=True, eq=False)
class LengthDistribution:
    """Output-length pmf over 1..max_len tokens, optionally one pmf per prompt-length bucket.

    Bucket k covers prompts with ``bucket_edges[k-1] <= prompt_len < bucket_edges[k]`` (open
    at both ends), so there are ``len(bucket_edges) + 1`` bucket pmfs. Arrays are read-only.
    """

    pmf: FloatArray  # probability per length; pmf[i] = P(L = i+1 tokens), last = P(L >= max_len)
    bucket_edges: tuple[int, ...] = ()  # tokens of prompt; strictly increasing, >= 1
    bucket_pmfs: tuple[FloatArray, ...] = ()  # probability; one pmf per bucket, same bins as pmf
    bucket_counts: tuple[int, ...] = ()  # observations per bucket (count); () when unknown
    _pooled: _InverseCdf = field(init=False, repr=False)
    _by_bucket: tuple[_InverseCdf, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pmf = _checked_pmf(self.pmf, "pmf", atol=_SUM_ATOL, renormalise=False)
        buckets = tuple(
            _checked_pmf(b, f"bucket_pmfs[{k}]", atol=_SUM_ATOL, renormalise=False)
            for k, b in enumerate(self.bucket_pmfs)
        )
        _check_buckets(self.bucket_edges, buckets, self.bucket_counts, pmf.size)
        object.__setattr__(self, "pmf", pmf)
        object.__setattr__(self, "bucket_pmfs", buckets)
        object.__setattr__(self, "_pooled", _InverseCdf.build(pmf))
        object.__setattr__(self, "_by_bucket", tuple(_InverseCdf.build(b) for b in buckets))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LengthDistribution):
            return NotImplemented
        return (
            np.array_equal(self.pmf, other.pmf)
            and self.bucket_edges == other.bucket_edges
            and self.bucket_counts == other.bucket_counts
            and len(self.bucket_pmfs) == len(other.bucket_pmfs)
            and all(map(np.array_equal, self.bucket_pmfs, other.bucket_pmfs))
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_pmf(cls, pmf: ArrayLike, *, atol: float = 1e-6) -> LengthDistribution:
        """Build from ``pmf[i]`` = P(L = i + 1 tokens).

        Args:
            pmf: finite, non-negative weights with a positive sum.
            atol: the sum must be within ``atol`` of 1; it is then renormalised to 1 exactly
                (up to rounding). Pass ``math.inf`` to accept raw counts.

        Raises:
            ValueError: empty, non-finite, negative, zero-sum or off-by-more-than-atol input.
        """
        return cls(_checked_pmf(pmf, "pmf", atol=atol, renormalise=True))

    @classmethod
    def from_observations(
        cls,
        prompt_len: ArrayLike,
        output_len: ArrayLike,
        finished: ArrayLike,
        *,
        max_len: int | None = None,
        bucket_edges: tuple[int, ...] | list[int] | None = None,
        min_bucket_count: int = 200,
    ) -> LengthDistribution:
        """Kaplan-Meier estimate from possibly censored observations.

        Risk set at length l: observations with ``output_len >= l`` (finished and censored);
        events at l: finished observations with ``output_len == l``. Survival left after
        ``max_len - 1`` (including mass beyond the largest observed length, about which the
        data say nothing) goes to the last bin ``max_len``. Lengths above ``max_len`` are
        clipped to it. A censored length c is read as L > c (vLLM's "length" finish reason;
        an EOS that is exactly the c-th token is also reported so, a negligible bias).

        Args:
            prompt_len, output_len, finished: parallel 1-D arrays (tokens, tokens, bool).
            max_len: last bin (tokens); default the largest observed length.
            bucket_edges: prompt-length edges (tokens). A bucket with fewer than
                ``min_bucket_count`` observations uses the pooled pmf instead of its own; if
                no bucket has enough, the result has no buckets at all.
            min_bucket_count: observations a bucket needs for its own estimate.
        """
        p, o, f = _check_observations(prompt_len, output_len, finished)
        top = int(o.max()) if max_len is None else _positive_int(max_len, "max_len")
        pooled = _kaplan_meier_pmf(o, f, top)
        if not bucket_edges:
            return cls(pooled)
        edges = tuple(int(e) for e in bucket_edges)
        _check_buckets(edges, (), (), top, check_pmfs=False)
        which = np.searchsorted(np.asarray(edges), p, side="right")
        counts = np.bincount(which, minlength=len(edges) + 1)
        if not (counts >= min_bucket_count).any():
            return cls(pooled)
        pmfs = tuple(
            _kaplan_meier_pmf(o[which == k], f[which == k], top)
            if count >= min_bucket_count
            else pooled
            for k, count in enumerate(counts.tolist())
        )
        return cls(pooled, edges, pmfs, tuple(counts.tolist()))

    @classmethod
    def from_authors_estimator(
        cls,
        prompt_len: ArrayLike,
        output_len: ArrayLike,
        finished: ArrayLike,
        *,
        context_len: int,
    ) -> LengthDistribution:
        """The authors' event/risk estimator (method.md §2.2), for comparison with KM.

        ``pdf[l] = event[l] / risk[l]`` for l < M = ``context_len``, where ``event[l]`` counts
        finished requests of length l with ``prompt_len + l < M`` and ``risk[l]`` counts requests
        with ``l <= M - prompt_len - 1``; ``pdf[M] = max(0, 1 - sum)``, then renormalised. Only
        the context limit is treated as censoring: a request cut by ``max_tokens`` stays in the
        risk set for lengths it never reached, so those ``pdf[l]`` are biased low and the
        missing mass lands in the last bin (the mean is biased high).
        """
        p, o, f = _check_observations(prompt_len, output_len, finished)
        top = _positive_int(context_len, "context_len")
        room = np.clip(top - 1 - p, 0, top - 1)
        risk = np.cumsum(np.bincount(room, minlength=top)[::-1])[::-1]
        events = np.bincount(o[f & (p + o < top)], minlength=top)
        pdf = np.zeros(top, dtype=np.float64)
        np.divide(events[1:], risk[1:], out=pdf[:-1], where=risk[1:] > 0)
        pdf[-1] = max(0.0, 1.0 - float(pdf[:-1].sum()))
        return cls(_checked_pmf(pdf, "pmf", atol=np.inf, renormalise=True))

    # ----------------------------------------------------------------- summaries
    @property
    def max_len(self) -> int:
        """Largest length (tokens), the bin that holds all mass at or beyond it."""
        return int(self.pmf.size)

    @property
    def has_buckets(self) -> bool:
        """Whether prompt-length buckets exist."""
        return bool(self.bucket_edges)

    def pmf_for(self, prompt_len: int | None = None) -> FloatArray:
        """The pmf used for a prompt of ``prompt_len`` tokens (pooled when None/no buckets)."""
        if prompt_len is None or not self.bucket_edges:
            return self.pmf
        return self.bucket_pmfs[self._bucket_index(prompt_len)]

    def mean(self, *, prompt_len: int | None = None) -> float:
        """Expected length (tokens), counting the last bin at ``max_len``."""
        pmf = self.pmf_for(prompt_len)
        return float(np.dot(np.arange(1, pmf.size + 1, dtype=np.float64), pmf))

    def cdf(self, *, prompt_len: int | None = None) -> FloatArray:
        """Copy of the CDF: ``cdf[i]`` = P(L <= i + 1 tokens), ending at exactly 1."""
        return self._sampler(prompt_len).cdf.copy()

    @overload
    def quantile(self, q: float, *, prompt_len: int | None = None) -> int: ...

    @overload
    def quantile(self, q: FloatArray, *, prompt_len: int | None = None) -> IntArray: ...

    def quantile(self, q: float | FloatArray, *, prompt_len: int | None = None) -> int | IntArray:
        """Smallest length l (tokens) with P(L <= l) >= q, for q in [0, 1] (elementwise)."""
        qs = np.asarray(q, dtype=np.float64)
        if not np.all((qs >= 0) & (qs <= 1)):
            raise ValueError("quantile levels must lie in [0, 1]")
        s = self._sampler(prompt_len)
        idx = np.clip(np.searchsorted(s.cdf, qs, side="left"), s.first, s.last)
        out = idx.astype(np.int64) + 1
        return int(out) if out.ndim == 0 else out

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        rng: np.random.Generator,
        n: int,
        *,
        max_tokens: ArrayLike | None = None,
        context_left: ArrayLike | None = None,
        prompt_len: ArrayLike | None = None,
    ) -> IntArray:
        """Draw ``n`` output lengths (tokens, int64), clipped to the caps and at least 1.

        Args:
            rng: the only source of randomness (one uniform per draw).
            n: number of draws.
            max_tokens: per-request output cap (tokens), an int or an array of length n.
            context_left: context room for output (tokens, ``M - prompt_len``), int or array.
            prompt_len: prompt tokens (int or array) selecting the bucket pmf, if any.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        u = rng.random(n)
        lengths = self._invert(u, prompt_len)
        return np.maximum(_clip(lengths, max_tokens, context_left), 1)

    def sample_conditional(
        self,
        rng: np.random.Generator,
        generated: ArrayLike,
        *,
        max_tokens: ArrayLike | None = None,
        context_left: ArrayLike | None = None,
        prompt_len: ArrayLike | None = None,
    ) -> IntArray:
        """Total lengths (tokens) of unfinished requests that already produced ``generated``.

        Draws from the pmf restricted to L > g (inverse CDF on u ~ U(F(g), 1)); where no mass
        lies beyond g the draw is g + 1. Caps apply to the total length as in :meth:`sample`;
        the result is never below g (nor below 1).
        """
        g = np.atleast_1d(np.asarray(generated))
        if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer) or (g < 0).any():
            raise ValueError("generated must be a non-negative integer scalar or 1-D array")
        g = g.astype(np.int64)
        v = rng.random(g.size)
        out = np.empty(g.size, dtype=np.int64)
        for sampler, mask in self._groups(prompt_len, g.size):
            gm = g[mask]
            f_g = sampler.cdf_at(gm)
            draw = sampler.invert(f_g + (1.0 - f_g) * v[mask])
            out[mask] = np.where(f_g >= 1.0, gm + 1, np.maximum(draw, gm + 1))
        floor: IntArray = np.maximum(_clip(out, max_tokens, context_left), np.maximum(g, 1))
        return floor

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe ``samullm.lengths/1`` document; pmfs stored without trailing zeros."""
        doc: dict[str, Any] = {
            "format": FORMAT_TAG,
            "max_len": self.max_len,
            "pmf": _trim(self.pmf),
            "buckets": None,
        }
        if self.bucket_edges:
            doc["buckets"] = {
                "edges": list(self.bucket_edges),
                "counts": list(self.bucket_counts),
                "pmfs": [_trim(b) for b in self.bucket_pmfs],
            }
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> LengthDistribution:
        """Inverse of :meth:`to_dict` (bit-exact); raises :class:`LengthFormatError`."""
        if not isinstance(doc, dict):
            raise LengthFormatError("<document>", "must be a JSON object")
        if doc.get("format") != FORMAT_TAG:
            raise LengthFormatError("format", f"expected {FORMAT_TAG!r}, got {doc.get('format')!r}")
        top = doc.get("max_len")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise LengthFormatError("max_len", "must be an integer >= 1")
        pmf = _untrim(doc.get("pmf"), top, "pmf")
        pooled = _build(cls, "pmf", pmf)
        buckets = doc.get("buckets")
        if buckets is None:
            return pooled
        if not isinstance(buckets, dict):
            raise LengthFormatError("buckets", "must be an object or null")
        raw_pmfs = buckets.get("pmfs")
        if not isinstance(raw_pmfs, list):
            raise LengthFormatError("buckets.pmfs", "must be a list")
        pmfs = tuple(_untrim(b, top, f"buckets.pmfs[{k}]") for k, b in enumerate(raw_pmfs))
        edges = _int_tuple(buckets.get("edges"), "buckets.edges")
        counts = _int_tuple(buckets.get("counts"), "buckets.counts")
        return _build(cls, "buckets", pmf, edges, pmfs, counts)

    # ----------------------------------------------------------------- internals
    def _bucket_of(self, prompt_len: NDArray[Any]) -> NDArray[np.intp]:
        return np.searchsorted(np.asarray(self.bucket_edges), prompt_len, side="right")

    def _bucket_index(self, prompt_len: int) -> int:
        return int(np.searchsorted(np.asarray(self.bucket_edges), prompt_len, side="right"))

    def _sampler(self, prompt_len: int | None) -> _InverseCdf:
        if prompt_len is None or not self.bucket_edges:
            return self._pooled
        return self._by_bucket[self._bucket_index(prompt_len)]

    def _groups(
        self, prompt_len: ArrayLike | None, n: int
    ) -> list[tuple[_InverseCdf, NDArray[np.bool_] | slice]]:
        """(sampler, selector) pairs covering draws 0..n-1, one per bucket in use."""
        if prompt_len is None or not self.bucket_edges:
            return [(self._pooled, slice(None))]
        which = np.broadcast_to(self._bucket_of(_int_array(prompt_len, n, "prompt_len")), (n,))
        return [(self._by_bucket[int(k)], which == k) for k in np.unique(which)]

    def _invert(self, u: FloatArray, prompt_len: ArrayLike | None) -> IntArray:
        out = np.empty(u.size, dtype=np.int64)
        for sampler, mask in self._groups(prompt_len, u.size):
            out[mask] = sampler.invert(u[mask])
        return out


# --------------------------------------------------------------------- helpers
def _kaplan_meier_pmf(output_len: IntArray, finished: NDArray[np.bool_], top: int) -> FloatArray:
    """KM pmf over 1..top; survival after ``top - 1`` goes to the last bin."""
    lengths = np.minimum(output_len, top)
    at_len = np.bincount(lengths, minlength=top + 1)
    at_risk = np.cumsum(at_len[::-1])[::-1]  # at_risk[l] = #{output_len >= l}
    events = np.bincount(lengths[finished], minlength=top + 1)
    hazard = np.zeros(top - 1, dtype=np.float64)
    np.divide(events[1:top], at_risk[1:top], out=hazard, where=at_risk[1:top] > 0)
    survival = np.concatenate(([1.0], np.cumprod(1.0 - hazard)))  # S(0..top-1)
    pmf = np.empty(top, dtype=np.float64)
    pmf[:-1] = survival[:-1] - survival[1:]
    pmf[-1] = survival[-1]
    pmf /= pmf.sum()
    return pmf


def _checked_pmf(pmf: ArrayLike, name: str, *, atol: float, renormalise: bool) -> FloatArray:
    arr = np.array(pmf, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite entries")
    if (arr < 0).any():
        raise ValueError(f"{name} has negative entries (first at index {int(np.argmax(arr < 0))})")
    total = float(arr.sum())
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    if abs(total - 1.0) > atol:
        raise ValueError(f"{name} sums to {total!r}, not 1 within {atol}")
    if renormalise:
        arr /= total
    arr.setflags(write=False)
    return arr


def _check_buckets(
    edges: tuple[int, ...],
    pmfs: tuple[FloatArray, ...],
    counts: tuple[int, ...],
    size: int,
    *,
    check_pmfs: bool = True,
) -> None:
    if any(isinstance(e, bool) or not isinstance(e, int) for e in edges):
        raise ValueError("bucket_edges must be integers")
    if edges and (edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False))):
        raise ValueError("bucket_edges must be strictly increasing and >= 1")
    if not check_pmfs:
        return
    if len(pmfs) != (len(edges) + 1 if edges else 0):
        raise ValueError(f"{len(edges)} bucket edges need {len(edges) + 1} pmfs, got {len(pmfs)}")
    if any(b.size != size for b in pmfs):
        raise ValueError("every bucket pmf must have max_len bins")
    if counts and len(counts) != len(pmfs):
        raise ValueError("bucket_counts must be empty or have one entry per bucket")


def _check_observations(
    prompt_len: ArrayLike, output_len: ArrayLike, finished: ArrayLike
) -> tuple[IntArray, IntArray, NDArray[np.bool_]]:
    p, o, f = np.asarray(prompt_len), np.asarray(output_len), np.asarray(finished)
    if p.ndim != 1 or p.size == 0 or p.shape != o.shape or p.shape != f.shape:
        raise ValueError("prompt_len, output_len and finished must be equal-length 1-D arrays")
    if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(o.dtype, np.integer)):
        raise ValueError("prompt_len and output_len must be integer arrays")
    if f.dtype != np.bool_:
        raise ValueError("finished must be a boolean array")
    if (p < 0).any() or (o < 1).any():
        raise ValueError("need prompt_len >= 0 and output_len >= 1")
    return p.astype(np.int64), o.astype(np.int64), f.copy()


def _clip(
    lengths: IntArray, max_tokens: ArrayLike | None, context_left: ArrayLike | None
) -> IntArray:
    for cap, name in ((max_tokens, "max_tokens"), (context_left, "context_left")):
        if cap is not None:
            lengths = np.minimum(lengths, _int_array(cap, lengths.size, name))
    return lengths


def _int_array(values: ArrayLike, n: int, name: str) -> IntArray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.size != n):
        raise ValueError(f"{name} must be a scalar or a 1-D array of length {n}")
    return arr.astype(np.int64)


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _trim(pmf: FloatArray) -> list[float]:
    return [float(x) for x in pmf[: int(np.flatnonzero(pmf)[-1]) + 1]]


def _untrim(raw: Any, top: int, name: str) -> FloatArray:
    if not isinstance(raw, list) or not raw or len(raw) > top:
        raise LengthFormatError(name, f"must be a non-empty list of at most max_len={top} numbers")
    if any(isinstance(x, bool) or not isinstance(x, int | float) for x in raw):
        raise LengthFormatError(name, "must contain only numbers")
    out = np.zeros(top, dtype=np.float64)
    out[: len(raw)] = raw
    return out


def _int_tuple(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in raw):
        raise LengthFormatError(name, "must be a list of integers")
    return tuple(raw)


def _build(cls: type[LengthDistribution], name: str, *args: Any) -> LengthDistribution:
    try:
        return cls(*args)
    except LengthFormatError:
        raise
    except ValueError as exc:
        raise LengthFormatError(name, str(exc)) from exc
