"""Online recalibration of each running model's step latency from measured progress (no I/O).

A progress event reports the mean step latency of a task's engine since its previous event
(``step_latency_s``) and the tokens of every request it runs. The planner's cost model predicts
the window's mean step: the decode step of the sequences running in the middle of the window
(the requests that finished in it count half) attending their context then, plus the prefill
of the requests that started in it (prompt and any recomputed prefix), spread over chunked
steps mixed with the decodes. The ratio measured / predicted is one
observation of how wrong the model's latency belief is. :class:`LatencyCalibration` keeps the
mean and spread of their logarithms (Welford), so the scale is a geometric mean and its
confidence a standard error; below :data:`MIN_WINDOWS` observations the scale stays 1.

Output lengths are measured the same way: :class:`ModelEstimates` fits, per model, the stretch
of its length distribution that best explains the outputs so far (exact lengths of requests
that stopped, lower bounds for those cut at their cap and for those still running;
:mod:`planning.length_scale`).

The live ETA (:mod:`coordinator.eta`) simulates the rest with the profile scaled by the latency
scale (:func:`planning.profile.scaled_profile`) and the lengths stretched, so a model 1.3x slower
than believed is predicted 1.3x slower after a few windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from planning.cost_model import StepCostModel
from planning.length_scale import LengthScaleFit, fit_length_scale

if TYPE_CHECKING:
    from coordinator.job import JobModel

MIN_WINDOWS = 3  # observations before the scale leaves 1
MIN_STEPS = 4  # engine steps a window needs to count
MAX_PREFILL_SHARE = 0.25  # of a window's predicted time; above it the window is not used
MAX_LOG_RATIO = math.log(20.0)  # a ratio beyond 20x either way is a glitch, not a belief error
# NOTE(calibration): windows that disagree this much (standard error of the mean log ratio) do
# not yet say how fast the model is; the scale stays 1 until they agree better. One noisy
# window of a 1.0x model could read 1.6x with log stderr 0.3 in the runtime tests.
MAX_LOG_STDERR = 0.1


@dataclass(slots=True)
class LatencyCalibration:
    """Measured / predicted step latency of one model, over decode windows."""

    n: int = 0  # windows observed
    mean: float = 0.0  # mean log ratio
    m2: float = 0.0  # sum of squared deviations of the log ratios

    def add(self, ratio: float) -> None:
        """One window's measured / predicted ratio (ignored when not finite or absurd)."""
        if not (ratio > 0 and math.isfinite(ratio)) or abs(math.log(ratio)) > MAX_LOG_RATIO:
            return
        x = math.log(ratio)
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def scale(self) -> float:
        """Latency multiplier to apply to the model's profile (1 until enough windows agree:
        at least MIN_WINDOWS, with a standard error of the log at most MAX_LOG_STDERR)."""
        if self.n < MIN_WINDOWS or self.stderr > MAX_LOG_STDERR:
            return 1.0
        return math.exp(self.mean)

    @property
    def stderr(self) -> float:
        """Standard error of the log scale (inf below two windows)."""
        if self.n < 2:
            return math.inf
        return math.sqrt(self.m2 / (self.n - 1) / self.n)

    def to_dict(self) -> dict[str, float | int | None]:
        """The state document: ``latency_scale``, ``windows``, ``log_stderr`` (None below 2)."""
        return {"latency_scale": self.scale, "windows": self.n,
                "log_stderr": self.stderr if math.isfinite(self.stderr) else None}  # fmt: skip


def window_ratio(
    step: StepCostModel,
    measured_s: float,
    steps: int,
    running: Mapping[str, int],
    finished: Mapping[str, int],
    joined: Mapping[str, int] | None = None,
    budget: int = 8192,
) -> float | None:
    """Measured / predicted mean step latency of one window, or None when it does not qualify
    (too few steps, nothing running). ``running``: key -> context tokens (prompt plus generated)
    at the window's end; ``finished``: the same for requests that ended in it; ``joined``: key
    -> tokens prefilled in the window (prompt plus any recomputed prefix) for requests that
    started in it, whose prefill is spread over chunked steps of ``budget`` tokens each mixed
    with the decodes (vLLM V1)."""
    if steps < MIN_STEPS or measured_s <= 0 or not (running or finished):
        return None
    half = steps / 2.0
    seqs = len(running) + 0.5 * len(finished)
    context = sum(max(c - half, 1.0) for c in running.values()) + 0.5 * sum(finished.values())
    b = max(1, round(seqs))
    decode = step.step_latency(0, b, b, round(context), 0.0)
    total = decode * steps
    prefill = sum((joined or {}).values())
    if prefill:
        chunks = min(max(1, math.ceil(prefill / budget)), steps)
        size = prefill / chunks
        pairs = sum(p * p / 2.0 for p in (joined or {}).values()) / chunks
        extra = chunks * (step.step_latency(round(size), b, b, round(context), pairs) - decode)
        if extra > MAX_PREFILL_SHARE * (total + extra):
            return None  # mostly prefill: the cost model's prefill terms are the least sure
        total += extra
    return measured_s * steps / total if total > 0 else None


@dataclass(frozen=True, slots=True)
class Window:
    """One progress window of a task: what :func:`window_ratio` needs."""

    measured_s: float  # s, mean step latency in the window
    steps: int  # engine steps in the window
    running: Mapping[str, int]  # key -> context tokens at the window's end
    finished: Mapping[str, int]  # key -> context tokens of requests that ended in it
    joined: Mapping[str, int] = field(default_factory=dict)  # key -> tokens prefilled in it


@dataclass(frozen=True, slots=True)
class Seen:
    """What a running job has seen of its requests' lengths so far."""

    done: Mapping[str, int]  # key -> output tokens, committed
    stopped: Collection[str]  # committed keys that ended on their own (not at their cap)
    running: Mapping[str, int]  # key -> tokens generated so far
    prompt_of: Callable[[str], int]  # key -> prompt tokens


@dataclass(slots=True)
class ModelEstimates:
    """Per model of one job: measured step latency and output lengths against belief."""

    job: JobModel
    latency: dict[str, LatencyCalibration] = field(default_factory=dict)  # model -> scale
    _fits: dict[str, tuple[tuple[int, int, int], LengthScaleFit]] = field(
        default_factory=dict
    )  # model -> (exact, capped, running tokens) it was fitted on, and the fit

    def observe(self, model: str, tp: int, w: Window) -> None:
        """Fold one window of a task running ``model`` on ``tp`` GPUs."""
        profile = self.job.loaded.graph.models[model].profiles.get(tp)
        if profile is None:
            return
        ratio = window_ratio(profile.step, w.measured_s, w.steps, w.running, w.finished,
                             w.joined, self.job.serving.max_num_batched_tokens)  # fmt: skip
        if ratio is not None:
            self.latency.setdefault(model, LatencyCalibration()).add(ratio)

    def latency_scale(self, model: str) -> float:
        """Measured / believed step latency (1 until measured)."""
        cal = self.latency.get(model)
        return cal.scale if cal is not None else 1.0

    def length_fit(self, model: str, seen: Seen) -> LengthScaleFit:
        """The stretch of ``model``'s lengths: from committed outputs (exact when they stopped,
        else a lower bound at the cap) and running requests' tokens (lower bounds)."""
        keys = [k for u, unit in enumerate(self.job.units) if unit.model == model
                for k in self.job.unit_keys[u]]  # fmt: skip
        exact = [k for k in keys if k in seen.stopped]
        capped = [k for k in keys if k in seen.done and k not in seen.stopped]
        running = [k for k in keys if k in seen.running]
        # what the fit rests on; a request moving from running to done changes it
        count = (len(exact), len(capped), sum(seen.running[k] for k in running))
        cached = self._fits.get(model)
        if cached is None or cached[0] != count:
            lengths = self.job.loaded.graph.models[model].lengths
            bounds = [seen.done[k] - 1 for k in capped] + [seen.running[k] for k in running]
            fit = fit_length_scale(
                lengths, [seen.done[k] for k in exact], bounds,
                finished_prompts=[seen.prompt_of(k) for k in exact],
                censored_prompts=[seen.prompt_of(k) for k in capped + running],
            )  # fmt: skip
            self._fits[model] = (count, fit)
        return self._fits[model][1]

    def to_dict(self, seen: Seen) -> dict[str, dict[str, float | int | None]]:
        """Per model: ``latency_scale``, ``windows``, ``log_stderr``, ``length_scale``,
        ``length_exact``, ``length_bounds``, ``length_log_width`` (the job state's
        ``calibration``)."""
        out: dict[str, dict[str, float | int | None]] = {}
        for model in sorted({u.model for u in self.job.units}):
            fit = self.length_fit(model, seen)
            cal = self.latency.get(model, LatencyCalibration())
            out[model] = {**cal.to_dict(), "length_scale": fit.scale,
                          "length_exact": fit.finished, "length_bounds": fit.censored,
                          "length_log_width": fit.log_width if fit.finished else None}  # fmt: skip
        return out
