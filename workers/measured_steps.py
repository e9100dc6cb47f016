"""Step latencies looked up in the raw A100 measurements (the sim engine's measured truth).

The planner predicts a step with a fitted linear model (:class:`planning.cost_model.
StepCostModel`). The measured truth does not use it: :class:`MeasuredSteps` answers from the
iteration records of ``a100_vllm030_iteration_latency.csv.gz`` (the authors' vLLM 0.3.0 fork on
A100-80GB; see the shared data README, section 1), by interpolation:

- the records hold, for every batch size B = 1..512, two decode points (every sequence holding
  about 1 token, and the KV-capacity end) and two padded-prefill points (about 1 token per
  prompt, and the token-budget end); of each nearly identical pair the faster one is kept, as
  the authors do;
- a decode step of B sequences attending K KV tokens takes the straight line through that B's
  two decode points, at K; a prefill step of B prompts padded to P tokens takes the line through
  that B's two prefill points, at P (beyond the measured range the line is extended);
- a batch size the records lack takes the nearest measured one, times B / B_nearest above it.

That is vLLM 0.3.0's step: prefill-only or decode-only. A mixed step (vLLM V1 semantics) is
answered as its prefill part plus its decode part minus one B=1 decode step (the fixed
per-step cost counted once); the measured truth is meant to run with ``scheduler: legacy030``.

A model without records of its own at a tp (Llama-2-70b, Mistral-7B, ...) borrows the records of
a measured *proxy* (same MLP kind, closest weight bytes per GPU at that tp) and scales each
step by the ratio of the two models' profile predictions for it: the measured shape, the
profiles' size ratio.

The latency of one step is linear in K for a fixed B, so a run of decode-only steps has the
closed form the simulator's bulk path uses (:meth:`MeasuredSteps.decode_run_latency`,
:meth:`MeasuredSteps.context_slope`).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from planning.cost_model import StepCost

MAX_RECORDED_BATCH = 512  # sequences; the records' grid is B = 1..512
_BLOCKS = {"decode_grid": "decode", "prefill_grid": "prefill"}


class MeasuredStepsError(ValueError):
    """The records file is missing, malformed, or has nothing for a (model, tp)."""


@dataclass(frozen=True, slots=True)
class Lines:
    """Per batch size B (index B - 1): a straight line through two measured points."""

    x_lo: NDArray[np.float64]  # tokens (K for decode, padded P for prefill); lower point
    y_lo: NDArray[np.float64]  # s at x_lo
    slope: NDArray[np.float64]  # s per token (>= 0)
    measured: NDArray[np.bool_]  # whether B has both points

    def at(self, batch: int, x: float) -> float:
        """Seconds of a step of ``batch`` sequences at ``x`` tokens."""
        b = max(1, int(batch))
        i = _nearest(self.measured, min(b, len(self.measured)) - 1)
        top = i + 1
        if b <= top:
            return float(self.y_lo[i] + self.slope[i] * (x - self.x_lo[i]))
        # more sequences than any record: b / top steps of ``top`` sequences each
        return float(self.y_lo[i] + self.slope[i] * (x * top / b - self.x_lo[i])) * b / top

    def slope_at(self, batch: int) -> float:
        """s per token of x along ``batch``'s line (what one more token of context costs)."""
        b = max(1, int(batch))
        i = _nearest(self.measured, min(b, len(self.measured)) - 1)
        return float(self.slope[i])


def _nearest(measured: NDArray[np.bool_], i: int) -> int:
    """Index of the measured batch size nearest to ``i`` (ties: the smaller)."""
    if measured[i]:
        return i
    idx = np.flatnonzero(measured)
    return int(idx[np.argmin(np.abs(idx - i))])


@dataclass(frozen=True, slots=True)
class Measured:
    """The decode and prefill lines of one (model, tp)."""

    model: str
    tp: int
    decode: Lines
    prefill: Lines


@dataclass(frozen=True, slots=True)
class MeasuredSteps:
    """A :class:`~planning.cost_model.StepCost` from measured lines (see module docstring).

    ``ratio`` (optional) is the proxy correction: a pair (this model's profile, the proxy's
    profile); each step's measured latency is multiplied by their predictions' ratio.
    """

    lines: Measured
    ratio: tuple[StepCost, StepCost] | None = None
    scale: float = 1.0  # every latency times this (the truth's latency_scale)

    def step_latency(
        self,
        prefill_tokens: int,
        decode_seqs: int,
        num_seqs: int,
        context_tokens: int,
        attn_pairs: float,
    ) -> float:
        """Seconds for one step (arguments as :meth:`StepCostModel.step_latency`)."""
        lat = self._raw(prefill_tokens, decode_seqs, num_seqs, context_tokens)
        if self.ratio is not None:
            mine, proxy = self.ratio
            args = (prefill_tokens, decode_seqs, num_seqs, context_tokens, attn_pairs)
            lat *= mine.step_latency(*args) / proxy.step_latency(*args)
        return lat * self.scale

    def _raw(self, prefill: int, decode_seqs: int, seqs: int, context: int) -> float:
        dec, pre = self.lines.decode, self.lines.prefill
        if prefill <= 0:
            return dec.at(decode_seqs, context)
        prefill_seqs = max(1, seqs - decode_seqs)
        lat = pre.at(prefill_seqs, prefill)
        if decode_seqs > 0:  # a V1 mixed step: add the decodes, the fixed cost once
            lat += dec.at(decode_seqs, max(decode_seqs, context - prefill)) - dec.at(1, 1)
        return lat

    def context_slope(self, num_seqs: int) -> float:
        """s per extra KV token in a decode step of ``num_seqs`` sequences."""
        slope = self.lines.decode.slope_at(num_seqs)
        if self.ratio is not None:
            mine, proxy = self.ratio
            slope *= mine.context_slope(num_seqs) / max(proxy.context_slope(num_seqs), 1e-30)
        return slope * self.scale

    def decode_run_latency(self, num_seqs: int, context_tokens: int, steps: int) -> float:
        """Total seconds of ``steps`` decode-only steps, K growing by ``num_seqs`` each."""
        if steps <= 0:
            return 0.0
        first = self.step_latency(0, num_seqs, num_seqs, context_tokens, 0.0)
        return first * steps + self.context_slope(num_seqs) * num_seqs * steps * (steps - 1) / 2


# ------------------------------------------------------------------ reading the records
def read_measured(path: Path) -> dict[tuple[str, int], Measured]:
    """Every (model, tp) with decode and prefill grids in the records file ``path``.

    Raises:
        MeasuredStepsError: unreadable file, a missing column or a bad number (names the line).
    """
    points: ByPhase = {}
    for line, row in _rows(path):
        phase = _BLOCKS.get(row["source_block"])
        if phase is None:
            continue
        try:
            key = (row["model"], int(row["tp"]), phase)
            b, pair = int(row["batch_size"]), int(row["pair_id"])
            x = float(row["sum_context_tokens" if phase == "decode" else "padded_tokens"])
            lat = float(row["latency_s"])
        except (KeyError, ValueError) as e:
            raise MeasuredStepsError(f"{path}:{line}: bad record ({e})") from None
        got = points.setdefault(key, {})
        old = got.get((b, pair))
        if old is None or lat < old[1]:  # the faster of a nearly identical pair
            got[(b, pair)] = (x, lat)
    out: dict[tuple[str, int], Measured] = {}
    for (model, tp), (dec, pre) in _pairs(points).items():
        out[(model, tp)] = Measured(model, tp, _lines(dec), _lines(pre))
    return out


def _rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, row
    except (OSError, EOFError, csv.Error) as e:
        raise MeasuredStepsError(f"{path}: cannot read the iteration records: {e}") from None


Points = dict[tuple[int, int], tuple[float, float]]  # (B, pair id) -> (tokens, s)
ByPhase = dict[tuple[str, int, str], Points]  # (model, tp, phase) -> points


def _pairs(points: ByPhase) -> dict[tuple[str, int], tuple[Points, Points]]:
    models = {(m, tp) for m, tp, _ in points}
    return {
        (m, tp): (points[(m, tp, "decode")], points[(m, tp, "prefill")])
        for m, tp in models
        if (m, tp, "decode") in points and (m, tp, "prefill") in points
    }


def _lines(points: Points) -> Lines:
    """Per B: the lower and upper measured points (pairs already reduced to their minimum)."""
    n = MAX_RECORDED_BATCH
    x_lo, y_lo = np.zeros(n), np.zeros(n)
    slope, measured = np.zeros(n), np.zeros(n, dtype=bool)
    per_b: dict[int, list[tuple[float, float]]] = {}
    for (b, _), xy in points.items():
        if 1 <= b <= n:
            per_b.setdefault(b, []).append(xy)
    for b, pts in per_b.items():
        lo, hi = min(pts), max(pts)
        if hi[0] <= lo[0]:
            continue
        i = b - 1
        x_lo[i], y_lo[i] = lo
        slope[i] = max(0.0, (hi[1] - lo[1]) / (hi[0] - lo[0]))
        measured[i] = True
    if not measured.any():
        raise MeasuredStepsError("no batch size has two measured points")
    return Lines(x_lo, y_lo, slope, measured)
