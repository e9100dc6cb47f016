"""Live remaining-time estimates from progress: conditional length sampling plus re-simulation.

For a running unit, every unfinished request has a prompt, tokens generated so far and a cap.
:func:`unit_remaining_s` draws each one's total length from the model's distribution restricted
to lengths above what it already generated (``sample_conditional``), adds the requests not yet
started (unconditional draws), and simulates the rest on the unit's engine with its dp. The
result is in engine seconds (simulated seconds on sim workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.job import JobModel
from planning.batching_sim import SimRequest, simulate_dp
from planning.estimate import engine_for
from planning.length_scale import stretched
from planning.profile import KNOWN_GPUS, scaled_profile

MIN_EXACT_LENGTHS = 10  # finished outputs before the fitted length stretch is used


@dataclass(frozen=True, slots=True)
class Pending:
    """One unfinished request of a running unit."""

    prompt_tokens: int  # tokens (prompt only)
    generated: int  # tokens generated so far
    max_tokens: int  # tokens, cap on the total output


def unit_remaining_s(
    job: JobModel, unit: int, tp: int, dp: int, pending: list[Pending], rng: np.random.Generator,
    latency_scale: float = 1.0, length_scale: float = 1.0,
) -> float:  # fmt: skip
    """Engine seconds until the unit's ``pending`` requests are done (one sampled outcome);
    ``latency_scale``: measured / believed step latency, ``length_scale``: the fitted stretch
    of the model's lengths (coordinator/calibration.py)."""
    if not pending:
        return 0.0
    info = job.loaded.graph.models[job.model(unit)]
    lengths = stretched(info.lengths, length_scale)
    profile = info.profiles.get(tp) or info.profiles[min(info.profiles)]
    profile = scaled_profile(profile, latency_scale)
    engine = engine_for(profile, KNOWN_GPUS[profile.gpu], job.serving)
    prompt = np.array([p.prompt_tokens for p in pending], dtype=np.int64)
    gen = np.array([p.generated for p in pending], dtype=np.int64)
    caps = np.array([p.max_tokens for p in pending], dtype=np.int64)
    room = np.maximum(engine.max_model_len - prompt, 1)
    total = lengths.sample_conditional(
        rng, gen, max_tokens=caps, context_left=room, prompt_len=prompt
    )
    reqs = [
        SimRequest(prompt_len=int(p), output_len=int(t), generated=int(min(g, t - 1)))
        for p, t, g in zip(prompt, total, gen, strict=True)
    ]
    return float(simulate_dp(reqs, engine, profile.step, max(dp, 1)).total_s)
