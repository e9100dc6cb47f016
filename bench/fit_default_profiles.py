"""Fit the default A100-80GB profile set shipped as ``planning/profiles/a100_80gb.json``.

For every (model, tp) in the shared vLLM 0.3.0 latency data: a fitted step model (features in
the legacy 0.3.0 convention of :mod:`planning.io.profiles`), the logged weight and KV bytes,
and the load time chosen by :func:`planning.io.profiles.read_load_times`. Models of
``model_sizes.json`` without latency data get a twin's measured step model when their config
is identical to a measured model (:data:`TWINS`), else the analytic fallback calibrated on all
measured models. Architectures and the calibration are stored too, so ``ProfileSet.get`` can
build analytic profiles for any other tp.

Run: ``PYTHONPATH=. python3 bench/fit_default_profiles.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from planning.cost_model import FittedStepModel, fit_step_model
from planning.io.profiles import (
    LegacyRecords,
    LoadTime,
    ModelSizes,
    read_load_times,
    read_model_sizes,
    read_vllm030_latency,
    write_profiles,
)
from planning.profile import (
    A100_80GB,
    AnalyticCalib,
    CalibrationSample,
    ModelArch,
    ModelProfile,
    ProfileSet,
    calibrate_analytic,
    profile_from_fit,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
OUT = REPO / "planning" / "profiles" / "a100_80gb.json"
LATENCY_FILE = "a100_vllm030_iteration_latency.csv.gz"
SIZES_FILE = "model_sizes.json"
LOAD_FILE = "a100_model_load_time.json"
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
        )  # fmt: skip
    return out


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
        p.max_model_len, p.source, p.fit_mape,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = read_vllm030_latency(args.data / LATENCY_FILE)
    sizes = read_model_sizes(args.data / SIZES_FILE, default_max_model_len=DEFAULT_MAX_MODEL_LEN)
    loads = read_load_times(args.data / LOAD_FILE)
    fits = {key: fit_step_model(d.records) for key, d in sorted(data.items())}
    steps, load_samples = calibration_inputs(data, sizes, loads)
    calib = calibrate_analytic(steps, load_samples, A100_80GB)
    measured = measured_entries(fits, sizes, loads, calib)
    profiles = {**measured, **fallback_entries(measured, sizes, loads, calib)}
    archs = {m: s.arch for m, s in sizes.items()}
    notes = {
        "generator": "bench/fit_default_profiles.py",
        "data": [LATENCY_FILE, SIZES_FILE, LOAD_FILE],
        "step_features": "vLLM 0.3.0 legacy convention (padded prefill, unmixed steps)",
        "twins": TWINS,
        "load_time_policy": "database unlabelled > database zxcpu5 > estimator; min of repeats",
    }
    write_profiles(args.out, ProfileSet(A100_80GB, profiles, archs, calib), notes=notes)
    print(f"{'model':48s} {'tp':>2s} {'source':40s} {'fit_mape':>8s} {'knee':>6s} {'load_s':>6s}")
    for (model, tp), p in sorted(profiles.items()):
        mape = "-" if p.fit_mape is None else f"{p.fit_mape:.3f}"
        print(f"{model:48s} {tp:2d} {p.source:40s} {mape:>8s} {p.step.knee_tokens:6.0f} "
              f"{p.load_time_s:6.1f}")  # fmt: skip
    print(f"wrote {len(profiles)} profiles to {args.out}")


if __name__ == "__main__":
    main()
