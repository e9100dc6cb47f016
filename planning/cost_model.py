"""Per-iteration latency model of an inference engine step.

One :class:`StepCostModel` serves one (model, tp, GPU type, engine version). A step's latency is
linear in a few features of the step's batch composition, with one hinge on the token count so
the model follows the roofline bend from weight-bandwidth-bound to compute-bound steps:

    latency = c_const
            + c_tokens * T + c_knee * max(0, T - knee_tokens)
            + c_seqs * S + c_context * K + c_attn * A

where T = tokens computed in the step (prefill tokens + decode sequences), S = sequences in the
step, K = KV tokens attended (sum over scheduled sequences of their context length after the
step) and A = attention query-key pairs of prefill work (sum over prefill chunks of
chunk_tokens x context length after the chunk).

Because the model is linear in K, a run of decode-only steps in which nothing but the context
grows has a closed-form total (:meth:`StepCostModel.decode_run_latency`): the simulator uses it
to skip over such runs in O(1).

The module also fits the model: :class:`StepRecords` (measured steps), :func:`fit_step_model`
(relative-error, non-negative least squares with a knee grid search; :func:`nnls` is a small
Lawson-Hanson solver), :func:`predict`, and :func:`extrapolate_tp` (a model for an unmeasured
tensor-parallel degree). See docs/cost-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

FEATURES: tuple[str, ...] = ("const", "tokens", "tokens_over_knee", "seqs", "context", "attn")


class StepCost(Protocol):
    """What the batching simulator asks of a step cost: :class:`StepCostModel` (the planner's
    fitted model) or a truth that looks steps up in measurements (workers/measured_steps.py)."""

    def step_latency(
        self,
        prefill_tokens: int,
        decode_seqs: int,
        num_seqs: int,
        context_tokens: int,
        attn_pairs: float,
    ) -> float:
        """Seconds for one step."""

    def context_slope(self, num_seqs: int) -> float:
        """Seconds one more KV token adds to a decode-only step of ``num_seqs`` sequences."""

    def decode_run_latency(self, num_seqs: int, context_tokens: int, steps: int) -> float:
        """Total seconds of ``steps`` decode-only steps, the context growing by ``num_seqs``."""


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Latency of one engine step from its composition.

    Coefficients are in seconds per unit of the matching entry of :data:`FEATURES`.
    """

    c_const: float  # s per step
    c_tokens: float  # s per token computed
    c_knee: float  # s per token computed above knee_tokens
    c_seqs: float  # s per sequence in the step
    c_context: float  # s per KV token attended
    c_attn: float  # s per prefill query-key pair
    knee_tokens: float  # tokens; where the compute-bound slope starts

    def step_latency(
        self,
        prefill_tokens: int,
        decode_seqs: int,
        num_seqs: int,
        context_tokens: int,
        attn_pairs: float,
    ) -> float:
        """Seconds for one step.

        Args:
            prefill_tokens: prompt (or recomputed) tokens scheduled this step.
            decode_seqs: sequences generating one new token this step.
            num_seqs: all sequences in the step (prefill chunks + decodes).
            context_tokens: KV tokens attended, summed over scheduled sequences.
            attn_pairs: sum over prefill chunks of chunk tokens x context after the chunk.
        """
        tokens = prefill_tokens + decode_seqs
        return (
            self.c_const
            + self.c_tokens * tokens
            + self.c_knee * max(0.0, tokens - self.knee_tokens)
            + self.c_seqs * num_seqs
            + self.c_context * context_tokens
            + self.c_attn * attn_pairs
        )

    def context_slope(self, num_seqs: int) -> float:
        """Seconds one more KV token adds to a decode-only step (the same at every size)."""
        return self.c_context

    def decode_run_latency(self, num_seqs: int, context_tokens: int, steps: int) -> float:
        """Total seconds of ``steps`` consecutive decode-only steps.

        Every step decodes ``num_seqs`` sequences; ``context_tokens`` is the K of the first
        step and grows by ``num_seqs`` each step. Equals the sum of :meth:`step_latency` over
        the run (exactly, up to float rounding).
        """
        if steps <= 0:
            return 0.0
        first = self.step_latency(0, num_seqs, num_seqs, context_tokens, 0.0)
        growth = self.c_context * num_seqs * steps * (steps - 1) / 2.0
        return first * steps + growth


# --------------------------------------------------------------------------------------------
# Step records, fitting and prediction.
# --------------------------------------------------------------------------------------------

RECORD_FIELDS: tuple[str, ...] = (
    "prefill_tokens",
    "decode_seqs",
    "num_seqs",
    "context_tokens",
    "attn_pairs",
    "latency_s",
)

# NOTE(cost-model): knee candidates in tokens. Dense at small T (where the A100 ridge point of
# fp16 matmuls lies, ~150-300 tokens) and coarse above; 0 means "no hinge" (c_knee then just
# adds to c_tokens, so the search never does worse than a plain linear model).
DEFAULT_KNEE_GRID: tuple[float, ...] = (
    0.0, 32.0, 64.0, 96.0, 128.0, 160.0, 192.0, 256.0, 320.0, 384.0, 512.0, 768.0, 1024.0,
    1536.0, 2048.0, 3072.0, 4096.0,
)  # fmt: skip

# NOTE(cost-model): iterations of iteratively reweighted least squares that turn the
# squared-relative-error fit into an (approximately) absolute-relative-error fit, i.e. the fit
# minimises MAPE rather than RMS relative error. 0 gives plain weighted least squares.
IRLS_ITERATIONS = 8
_IRLS_FLOOR = 1e-3  # relative error below which a row's L1 weight stops growing


@dataclass(frozen=True, slots=True)
class StepRecords:
    """Measured engine steps: equal-length 1-D float arrays, one entry per step.

    Feature conventions are those of :class:`StepCostModel`; see :mod:`planning.io.profiles`
    for how vLLM 0.3.0 (padded, unmixed) steps map onto them.
    """

    prefill_tokens: np.ndarray  # tokens per step
    decode_seqs: np.ndarray  # sequences per step
    num_seqs: np.ndarray  # sequences per step
    context_tokens: np.ndarray  # KV tokens attended per step
    attn_pairs: np.ndarray  # query-key pairs per step
    latency_s: np.ndarray  # s per step

    def __post_init__(self) -> None:
        length: int | None = None
        for name in RECORD_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"StepRecords.{name}: expected a 1-D array, got shape {arr.shape}")
            if length is not None and arr.shape[0] != length:
                raise ValueError(
                    f"StepRecords.{name}: length {arr.shape[0]} differs from {length} "
                    f"({RECORD_FIELDS[0]})"
                )
            length = arr.shape[0]
            if not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"StepRecords.{name}: non-finite value at index "
                    f"{int(np.argmin(np.isfinite(arr)))}"
                )
            if np.any(arr < 0):
                raise ValueError(
                    f"StepRecords.{name}: negative value at index {int(np.argmax(arr < 0))}"
                )
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.latency_s.shape[0])

    def take(self, index: np.ndarray) -> StepRecords:
        """Records at ``index`` (an integer index array or a boolean mask)."""
        return StepRecords(*(getattr(self, name)[index] for name in RECORD_FIELDS))

    @staticmethod
    def concat(parts: list[StepRecords]) -> StepRecords:
        """All records of ``parts``, in order."""
        if not parts:
            raise ValueError("StepRecords.concat: no parts given")
        return StepRecords(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in RECORD_FIELDS)
        )


@dataclass(frozen=True, slots=True)
class FittedStepModel:
    """A fitted :class:`StepCostModel` with its in-sample relative errors."""

    model: StepCostModel
    mape: float  # fraction; mean |pred - y| / y over the fitted records
    max_ape: float  # fraction; worst |pred - y| / y over the fitted records
    n: int  # records fitted


def design_matrix(records: StepRecords, knee_tokens: float) -> np.ndarray:
    """Feature matrix (n x 6) in the order of :data:`FEATURES`."""
    tokens = records.prefill_tokens + records.decode_seqs
    return np.column_stack(
        [
            np.ones_like(tokens),
            tokens,
            np.maximum(0.0, tokens - knee_tokens),
            records.num_seqs,
            records.context_tokens,
            records.attn_pairs,
        ]
    )


def _model_from(coef: np.ndarray, knee_tokens: float) -> StepCostModel:
    c = [float(v) for v in coef]
    return StepCostModel(c[0], c[1], c[2], c[3], c[4], c[5], float(knee_tokens))


def coefficients(model: StepCostModel) -> np.ndarray:
    """The model's coefficients in the order of :data:`FEATURES`."""
    return np.array(
        [model.c_const, model.c_tokens, model.c_knee, model.c_seqs, model.c_context,
         model.c_attn]
    )  # fmt: skip


def predict(model: StepCostModel, records: StepRecords) -> np.ndarray:
    """Vectorised :meth:`StepCostModel.step_latency` over ``records`` (seconds)."""
    result: np.ndarray = design_matrix(records, model.knee_tokens) @ coefficients(model)
    return result


def relative_errors(model: StepCostModel, records: StepRecords) -> np.ndarray:
    """|predicted - measured| / measured per record (fraction)."""
    if np.any(records.latency_s <= 0):
        raise ValueError("StepRecords.latency_s: relative error needs positive latencies")
    err: np.ndarray = np.abs(predict(model, records) - records.latency_s) / records.latency_s
    return err


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, ``argmin ||a x - b||`` subject to ``x >= 0``.

    Lawson and Hanson's active-set method (Solving Least Squares Problems, 1974, ch. 23):
    move the variable with the largest gradient into the passive (free) set, solve the
    unconstrained problem on that set, and step back towards the last feasible point while
    the solution has non-positive entries. Meant for the handful of columns used here.

    Raises:
        ValueError: on shape mismatch or non-finite input.
    """
    if a.ndim != 2 or b.ndim != 1 or a.shape[0] != b.shape[0]:
        raise ValueError(f"nnls: incompatible shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("nnls: non-finite input")
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10.0 * np.finfo(float).eps * max(a.shape) * float(np.abs(a).sum(axis=0).max(initial=0))
    if a.shape[0] > 2 * n:
        # Same minimiser on the n x n triangular factor: ||a x - b|| = ||r x - q'b|| + const.
        q, r = np.linalg.qr(a)
        a, b = r, q.T @ b
    for _ in range(max_iter if max_iter is not None else 3 * n + 10):
        grad = a.T @ (b - a @ x)
        free = ~passive & (grad > tol)
        if not free.any():
            break
        passive[int(np.argmax(np.where(free, grad, -np.inf)))] = True
        x, passive = _nnls_inner(a, b, x, passive)
    return x


def _nnls_inner(
    a: np.ndarray, b: np.ndarray, x: np.ndarray, passive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lawson-Hanson inner loop: least squares on ``passive``, kept feasible.

    Each pass drops at least one coordinate from ``passive`` (the one whose ratio sets the
    step is zeroed exactly: in floating point it can stay at a subnormal value while the step
    rounds to 0, and the loop would never end), so it stops within ``x.size`` passes.
    """
    for _ in range(x.size + 1):
        z = np.zeros_like(x)
        z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
        bad = passive & (z <= 0)
        if not bad.any():
            return z, passive
        ratios = x[bad] / (x[bad] - z[bad])
        alpha = float(np.min(ratios))
        x = x + alpha * (z - x)
        x[np.flatnonzero(bad)[ratios <= alpha]] = 0.0
        passive = passive & (x > 0)
        x[~passive] = 0.0
        if not passive.any():
            return x, passive
    return x, passive


def fit_relative_nnls(
    x: np.ndarray, y: np.ndarray, *, iterations: int = IRLS_ITERATIONS
) -> tuple[np.ndarray, float]:
    """Non-negative ``k`` minimising about mean(|x k - y| / y); returns (k, that mean).

    Rows are divided by their target (relative error), columns scaled to unit norm, and
    ``iterations`` rounds of iteratively reweighted NNLS turn squared into absolute error.
    """
    rows = x / y[:, None]  # relative-error rows, target 1
    scale = np.sqrt((rows * rows).sum(axis=0))
    scale[scale == 0] = 1.0
    rows = rows / scale
    weights = np.ones_like(y)
    coef = np.zeros(rows.shape[1])
    resid = np.ones_like(y)
    for _ in range(iterations + 1):
        sw = np.sqrt(weights)
        coef = nnls(rows * sw[:, None], sw)
        resid = np.abs(rows @ coef - 1.0)
        weights = 1.0 / np.maximum(resid, _IRLS_FLOOR)
    result: np.ndarray = coef / scale
    return result, float(resid.mean())


def _fit_at_knee(records: StepRecords, knee_tokens: float) -> np.ndarray:
    """Non-negative coefficients minimising the mean absolute relative error at one knee."""
    coef, _ = fit_relative_nnls(design_matrix(records, knee_tokens), records.latency_s)
    return coef


def fit_step_model(
    records: StepRecords, *, knee_grid: tuple[float, ...] | list[float] | None = None
) -> FittedStepModel:
    """Fit a :class:`StepCostModel` to measured steps.

    The fit minimises relative error (rows weighted by 1 / latency, then reweighted towards
    an L1 objective, see :data:`IRLS_ITERATIONS`) with non-negative coefficients
    (:func:`nnls`); the knee is the entry of ``knee_grid`` (default
    :data:`DEFAULT_KNEE_GRID`) with the lowest in-sample MAPE.

    Raises:
        ValueError: when there are fewer records than coefficients, a latency is not
            positive, or the knee grid is empty or negative.
    """
    grid = tuple(DEFAULT_KNEE_GRID if knee_grid is None else knee_grid)
    if not grid or min(grid) < 0:
        raise ValueError(f"fit_step_model: knee_grid must be non-empty and >= 0, got {grid}")
    if len(records) < len(FEATURES):
        raise ValueError(f"fit_step_model: need >= {len(FEATURES)} records, got {len(records)}")
    if np.any(records.latency_s <= 0):
        raise ValueError("StepRecords.latency_s: fitting needs positive latencies")
    best: FittedStepModel | None = None
    for knee in grid:
        model = _model_from(_fit_at_knee(records, knee), knee)
        ape = relative_errors(model, records)
        if best is None or float(ape.mean()) < best.mape:
            best = FittedStepModel(model, float(ape.mean()), float(ape.max()), len(records))
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------
# Tensor-parallel extrapolation.
# --------------------------------------------------------------------------------------------


def tp_probe_records() -> StepRecords:
    """Synthetic step compositions on which :func:`extrapolate_tp` compares models.

    Decode steps of B = 1..512 sequences at 1..4096 context tokens each, and prefill steps of
    1..8192 tokens split into prompts of 1..T tokens (attn pairs as for padded prompts).
    Latencies are placeholders (1 s).
    """
    rows: list[tuple[float, float, float, float, float]] = []
    for b in np.unique(np.round(np.geomspace(1, 512, 24))):
        rows += [(0.0, b, b, b * per_seq, 0.0) for per_seq in (1, 8, 64, 256, 1024, 4096)]
    for t in np.unique(np.round(np.geomspace(1, 8192, 30))):
        for s in np.unique(np.round(np.geomspace(1, t, 8))):
            b = max(1.0, float(np.round(t / s)))
            rows.append((b * s, 0.0, b, b * s, b * s * s))
    t = np.array(rows, dtype=np.float64)
    return StepRecords(t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4], np.ones(len(rows)))


def extrapolate_tp(fits: dict[int, StepCostModel], tp: int) -> StepCostModel:
    """A step model for ``tp`` from models fitted at other tps of the same model and GPU.

    NOTE(cost-model): extrapolation is done on latencies, not coefficients. Each model is
    evaluated on :func:`tp_probe_records`; at every probe the latency is fitted as a power law
    ``a * tp**(-beta)`` (least squares in log-log space over the given tps) and evaluated at
    ``tp``; a fresh :class:`StepCostModel` is then fitted to those latencies. Coefficient-wise
    ``a + b/tp`` through tp 1 and 2 is fragile because the per-tp fits choose different knees
    (measured tp4 error 27% vs 13% for this method, see docs/cost-model.md).

    Raises:
        ValueError: fewer than two distinct tps, tp < 1, or a non-positive prediction.
    """
    if len(fits) < 2 or min(fits) < 1 or tp < 1:
        raise ValueError(f"extrapolate_tp: need >= 2 fitted tps >= 1, got {sorted(fits)} -> {tp}")
    probes = tp_probe_records()
    tps = np.array(sorted(fits), dtype=np.float64)
    preds = np.array([predict(fits[int(t)], probes) for t in tps])
    if np.any(preds <= 0):
        raise ValueError("extrapolate_tp: a model predicts a non-positive latency")
    basis = np.column_stack([np.ones_like(tps), np.log(tps)])
    coef = np.linalg.lstsq(basis, np.log(preds), rcond=None)[0]
    target = np.exp(coef[0] + coef[1] * np.log(float(tp)))
    fitted = fit_step_model(
        StepRecords(
            probes.prefill_tokens, probes.decode_seqs, probes.num_seqs,
            probes.context_tokens, probes.attn_pairs, target,
        )
    )  # fmt: skip
    return fitted.model
