"""``samullm fit-profile``: fit step cost models from measured steps and write a profile file.

Records are canonical step records (CSV, JSON or JSONL with the columns of
:data:`planning.io.profiles.CANONICAL_COLUMNS`, V1 feature semantics) or, with
``--raw-vllm030``, files in the shared vLLM 0.3.0 latency format (legacy padded semantics).
Memory, context limit and load time of each model come from the shipped A100 profile set when
it knows the model at that tp (same GPU), else from ``--model-sizes`` (architecture) and
``--load-times`` or the analytic load-time model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from planning.cost_model import FittedStepModel, StepRecords, fit_step_model
from planning.io.profiles import (
    VLLM030_GPU,
    ProfileError,
    load_default_profiles,
    read_load_times,
    read_model_sizes,
    read_step_records,
    read_vllm030_latency,
    write_profiles,
)
from planning.profile import (
    KNOWN_GPUS,
    ModelArch,
    ModelProfile,
    ProfileSet,
    UnknownModelError,
    profile_from_fit,
)


class CliError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def register(subparsers: Any) -> None:
    """Add the ``fit-profile`` sub-command."""
    p = subparsers.add_parser("fit-profile", help="fit step cost models, write a profile file")
    p.add_argument("records", nargs="+", type=Path, help="step record files")
    p.add_argument("--out", required=True, type=Path, help="profile file to write")
    p.add_argument("--gpu", help=f"GPU name, one of {', '.join(KNOWN_GPUS)} (default: records')")
    p.add_argument("--raw-vllm030", action="store_true", help="records are the 0.3.0 raw format")
    p.add_argument("--model-sizes", type=Path, help="model_sizes.json for unknown models")
    p.add_argument("--load-times", type=Path, help="a100_model_load_time.json-style load times")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``samullm fit-profile``; returns the exit code."""
    try:
        profiles = _fit(args)
        write_profiles(args.out, profiles, notes={"generator": "samullm fit-profile"})
    except (CliError, ProfileError, UnknownModelError, ValueError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, UnknownModelError) and exc.args else exc
        print(f"samullm fit-profile: error: {msg}", file=sys.stderr)
        return 2
    _print_table(profiles)
    print(f"wrote {len(profiles.profiles)} profiles to {args.out}")
    return 0


def _read(args: argparse.Namespace) -> dict[tuple[str, int, str], StepRecords]:
    records: dict[tuple[str, int, str], list[StepRecords]] = {}
    for path in args.records:
        if args.raw_vllm030:
            found = {(m, tp, VLLM030_GPU): d.records for (m, tp), d in
                     read_vllm030_latency(path).items()}  # fmt: skip
        else:
            found = read_step_records(path)
        for key, rec in found.items():
            records.setdefault(key, []).append(rec)
    gpus = sorted({g for _, _, g in records})
    gpu = args.gpu or (gpus[0] if len(gpus) == 1 else None)
    if gpu is None:
        raise CliError(f"records hold several GPUs ({', '.join(gpus)}); choose one with --gpu")
    chosen = {k: StepRecords.concat(v) for k, v in records.items() if k[2] == gpu}
    if not chosen:
        raise CliError(f"no records for GPU {gpu!r} (records hold: {', '.join(gpus)})")
    return chosen


def _fit(args: argparse.Namespace) -> ProfileSet:
    records = _read(args)
    gpu_name = next(iter(records))[2]
    if gpu_name not in KNOWN_GPUS:
        raise CliError(f"unknown GPU {gpu_name!r}; known: {', '.join(KNOWN_GPUS)}")
    gpu = KNOWN_GPUS[gpu_name]
    base = load_default_profiles()
    same_gpu = base.gpu.name == gpu.name
    archs: dict[str, ModelArch] = dict(base.archs)
    if args.model_sizes is not None:
        archs.update({m: s.arch for m, s in read_model_sizes(args.model_sizes).items()})
    loads = {} if args.load_times is None else read_load_times(args.load_times)
    out: dict[tuple[str, int], ModelProfile] = {}
    for (model, tp, _), rec in sorted(records.items()):
        fit = fit_step_model(rec)
        known = base.profiles.get((model, tp)) if same_gpu else None
        load = loads.get((model, tp))
        out[(model, tp)] = _profile(model, tp, gpu.name, fit, known, archs.get(model),
                                    None if load is None else load.seconds, base)  # fmt: skip
    used = {m for m, _ in out}
    return ProfileSet(gpu, out, {m: a for m, a in archs.items() if m in used}, base.calib)


def _profile(
    model: str, tp: int, gpu: str, fit: FittedStepModel, known: ModelProfile | None,
    arch: ModelArch | None, load_s: float | None, base: ProfileSet,
) -> ModelProfile:  # fmt: skip
    """Measured profile; memory from ``known`` (shipped profile) or ``arch``."""
    if known is not None:  # keep everything known about memory; replace the step model
        return dataclasses.replace(
            known, gpu=gpu, step=fit.model, source="measured", fit_mape=fit.mape,
            load_time_s=known.load_time_s if load_s is None else load_s,
        )  # fmt: skip
    if arch is None:
        raise CliError(
            f"model {model!r} (tp={tp}): no shipped profile and no config; "
            "pass --model-sizes with its architecture"
        )
    return profile_from_fit(
        model, tp, KNOWN_GPUS[gpu], fit, arch, load_time_s=load_s, calib=base.calib
    )


def _print_table(profiles: ProfileSet) -> None:
    print(f"{'model':48s} {'tp':>2s} {'knee':>6s} {'mape':>6s} {'load_s':>6s}")
    for (model, tp), p in sorted(profiles.profiles.items()):
        mape = "-" if p.fit_mape is None else f"{p.fit_mape:.3f}"
        print(f"{model:48s} {tp:2d} {p.step.knee_tokens:6.0f} {mape:>6s} {p.load_time_s:6.1f}")
