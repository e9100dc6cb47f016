"""Fit the default A100-80GB profile set shipped as ``planning/profiles/a100_80gb.json``.

For every (model, tp) in the shared vLLM 0.3.0 latency data: a fitted step model (features in
the legacy 0.3.0 convention of :mod:`planning.io.profiles`), the logged weight and KV bytes,
the activation bytes of vLLM's profiling run (``a100_vllm030_profile_runs.csv``, see
:meth:`planning.profile.ProfileRun.activation_bytes`) and the load time chosen by
:func:`planning.io.profiles.read_load_times`. Models of
``model_sizes.json`` without latency data get a twin's measured step model when their config
is identical to a measured model (:data:`TWINS`), else the analytic fallback calibrated on all
measured models (step, load time and activation bytes). Architectures and the calibration are
stored too, so ``ProfileSet.get`` can build analytic profiles for any other tp. The activation
table printed first checks the KV blocks against the logged ``num_gpu_blocks`` and gives the
activation model's leave-one-model-out error.

Run: ``PYTHONPATH=. python3 bench/fit_default_profiles.py`` (about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from planning.cost_model import FittedStepModel, fit_step_model
from planning.io.profiles import (
    LegacyRecords,
    LoadTime,
    ModelSizes,
    read_load_times,
    read_model_sizes,
    read_profile_runs,
    read_vllm030_latency,
    write_profiles,
)
from planning.profile import (
    A100_80GB,
    AnalyticCalib,
    CalibrationSample,
    ModelArch,
    ModelProfile,
    ProfileRun,
    ProfileSet,
    calibrate_analytic,
    estimate_activation_bytes,
    fit_activation,
    profile_from_fit,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
OUT = REPO / "planning" / "profiles" / "a100_80gb.json"
LATENCY_FILE = "a100_vllm030_iteration_latency.csv.gz"
SIZES_FILE = "model_sizes.json"
LOAD_FILE = "a100_model_load_time.json"
RUNS_FILE = "a100_vllm030_profile_runs.csv"
# NOTE(profiles): identical HF configs (layers, hidden, heads, intermediate, vocab, MoE shape).
TWINS = {
    "WizardLMTeam/WizardLM-13B-V1.2": "NousResearch/Llama-2-13b-hf",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1",
}
# NOTE(profiles): stablelm-tuned-alpha-7b has no max_model_len in model_sizes.json; its HF
# config's max_position_embeddings is 4096.
DEFAULT_MAX_MODEL_LEN = 4096
TPS = (1, 2, 4)


def calibration_inputs(
    data: dict[tuple[str, int], LegacyRecords],
    sizes: dict[str, ModelSizes],
    loads: dict[tuple[str, int], LoadTime],
) -> tuple[list[CalibrationSample], list[tuple[ModelArch, int, float]]]:
    """Step samples of every measured (model, tp); load samples from one machine."""
    steps = [CalibrationSample(sizes[m].arch, tp, d.records) for (m, tp), d in sorted(data.items())]
    # NOTE(profiles): load-time calibration uses only the database's unlabelled machine,
    # the one policy-preferred machine, so the fit describes a single server.
    load = [
        (sizes[m].arch, tp, lt.seconds)
        for (m, tp), lt in sorted(loads.items())
        if m in sizes and lt.machine == "unlabelled" and lt.source.endswith("database.py")
    ]
    return steps, load


def measured_entries(
    fits: dict[tuple[str, int], FittedStepModel],
    sizes: dict[str, ModelSizes],
    loads: dict[tuple[str, int], LoadTime],
    calib: AnalyticCalib,
    activations: dict[tuple[str, int], int],
) -> dict[tuple[str, int], ModelProfile]:
    """One measured profile per fitted (model, tp)."""
    out = {}
    for (model, tp), fit in sorted(fits.items()):
        s = sizes[model]
        lt = loads.get((model, tp))
        out[(model, tp)] = profile_from_fit(
            model, tp, A100_80GB, fit, s.arch,
            weight_bytes_per_gpu=s.weight_bytes_per_gpu.get(tp),
            kv_bytes_per_token_per_gpu=s.kv_bytes_per_token_per_gpu.get(tp),
            load_time_s=None if lt is None else lt.seconds, calib=calib,
            activation_bytes_per_gpu=activations.get((model, tp)),
        )  # fmt: skip
    return out


def measured_activations(
    runs: dict[tuple[str, int], ProfileRun], sizes: dict[str, ModelSizes]
) -> dict[tuple[str, int], int]:
    """Activation bytes per GPU of every (model, tp) with a profiling run and known weights."""
    out = {}
    for (model, tp), run in sorted(runs.items()):
        weights = sizes[model].weight_bytes_per_gpu.get(tp) if model in sizes else None
        if weights is not None:
            out[(model, tp)] = run.activation_bytes(weights)
    return out


def activation_table(
    runs: dict[tuple[str, int], ProfileRun],
    sizes: dict[str, ModelSizes],
    activations: dict[tuple[str, int], int],
) -> None:
    """Print logged vs reproduced KV blocks and the leave-one-model-out activation estimate."""
    print(f"{'model':48s} {'tp':>2s} {'act GB':>6s} {'logged':>7s} {'peak-w':>7s} {'ours':>7s} "
          f"{'LOMO GB':>7s} {'LOMO blocks':>11s}")  # fmt: skip
    act_err, block_err = [], []
    for (model, tp), act in sorted(activations.items()):
        run, arch = runs[(model, tp)], sizes[model].arch
        others = [(sizes[m].arch, t, a) for (m, t), a in activations.items() if m != model]
        loo = estimate_activation_bytes(arch, tp, fit_activation(others))
        blocks = [_blocks(run, sizes[model].weight_bytes_per_gpu[tp], a)
                  for a in (run.profiled_peak_memory_bytes - sizes[model].weight_bytes_per_gpu[tp],
                            act, loo)]  # fmt: skip
        act_err.append(abs(loo - act) / act)
        block_err.append(abs(blocks[2] - run.num_gpu_blocks) / run.num_gpu_blocks)
        print(f"{model:48s} {tp:2d} {act / 1e9:6.3f} {run.num_gpu_blocks:7d} {blocks[0]:7d} "
              f"{blocks[1]:7d} {loo / 1e9:7.3f} {blocks[2]:11d}")  # fmt: skip
    print(f"activation model, leave one model out: MAPE {np.mean(act_err):.3f} (max "
          f"{np.max(act_err):.3f}); KV blocks off by {np.mean(block_err):.2%} on average "
          f"(max {np.max(block_err):.2%})\n")  # fmt: skip


def _blocks(run: ProfileRun, weights: int, activation: int) -> int:
    """KV blocks vLLM 0.3.0 allocates with these weight and activation bytes."""
    free = run.total_gpu_memory_bytes * run.gpu_memory_utilization - weights - activation
    return int(free // run.kv_cache_bytes_per_block)


def fallback_entries(
    measured: dict[tuple[str, int], ModelProfile],
    sizes: dict[str, ModelSizes],
    loads: dict[tuple[str, int], LoadTime],
    calib: AnalyticCalib,
) -> dict[tuple[str, int], ModelProfile]:
    """Twin or analytic profiles for models without latency data, at tps where they fit."""
    have = {m for m, _ in measured}
    sets = ProfileSet(A100_80GB, measured, {m: s.arch for m, s in sizes.items()}, calib)
    out = {}
    for model, s in sorted(sizes.items()):
        if model in have:
            continue
        for tp in TPS:
            p = sets.resolve(model, tp, twin=TWINS.get(model))
            weights = s.weight_bytes_per_gpu.get(tp, p.weight_bytes_per_gpu)
            lt = loads.get((model, tp))
            p = _replace_memory(p, weights, lt.seconds if lt else p.load_time_s)
            try:
                p.kv_capacity_blocks(A100_80GB.memory_bytes)
            except ValueError:
                continue  # the weights do not fit at this tp
            out[(model, tp)] = p
    return out


def _replace_memory(p: ModelProfile, weights: int, load_s: float) -> ModelProfile:
    return ModelProfile(
        p.model, p.tp, p.gpu, p.step, load_s, weights, p.kv_bytes_per_token_per_gpu,
        p.max_model_len, p.source, p.fit_mape, p.activation_bytes_per_gpu,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = read_vllm030_latency(args.data / LATENCY_FILE)
    sizes = read_model_sizes(args.data / SIZES_FILE, default_max_model_len=DEFAULT_MAX_MODEL_LEN)
    loads = read_load_times(args.data / LOAD_FILE)
    runs = read_profile_runs(args.data / RUNS_FILE)
    activations = measured_activations(runs, sizes)
    activation_table(runs, sizes, activations)
    fits = {key: fit_step_model(d.records) for key, d in sorted(data.items())}
    steps, load_samples = calibration_inputs(data, sizes, loads)
    act_samples = [(sizes[m].arch, tp, a) for (m, tp), a in sorted(activations.items())]
    calib = calibrate_analytic(steps, load_samples, A100_80GB, activation_samples=act_samples)
    measured = measured_entries(fits, sizes, loads, calib, activations)
    profiles = {**measured, **fallback_entries(measured, sizes, loads, calib)}
    archs = {m: s.arch for m, s in sizes.items()}
    notes = {
        "generator": "bench/fit_default_profiles.py",
        "data": [LATENCY_FILE, SIZES_FILE, LOAD_FILE, RUNS_FILE],
        "step_features": "vLLM 0.3.0 legacy convention (padded prefill, unmixed steps)",
        "twins": TWINS,
        "load_time_policy": "database unlabelled > database zxcpu5 > estimator; min of repeats",
        "activation_bytes": "measured: profiled peak - weights (or what num_gpu_blocks implies "
        "where another tp worker peaked higher); twins: the twin's; analytic: fitted model",
    }
    write_profiles(args.out, ProfileSet(A100_80GB, profiles, archs, calib), notes=notes)
    print(f"{'model':48s} {'tp':>2s} {'source':40s} {'fit_mape':>8s} {'knee':>6s} {'load_s':>6s} "
          f"{'act GB':>6s} {'blocks':>7s}")  # fmt: skip
    for (model, tp), p in sorted(profiles.items()):
        mape = "-" if p.fit_mape is None else f"{p.fit_mape:.3f}"
        print(f"{model:48s} {tp:2d} {p.source:40s} {mape:>8s} {p.step.knee_tokens:6.0f} "
              f"{p.load_time_s:6.1f} {p.activation_bytes_per_gpu / 1e9:6.3f} "
              f"{p.kv_capacity_blocks(A100_80GB.memory_bytes):7d}")  # fmt: skip
    print(f"wrote {len(profiles)} profiles to {args.out}")


if __name__ == "__main__":
    main()
