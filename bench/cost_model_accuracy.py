"""Accuracy of the step cost model on the shared A100 vLLM 0.3.0 latency data.

Three tables:

1. hold-out: per (model, tp), a seeded random 80/20 split of the nearly identical pairs
   (``pair_id`` groups; start-up and warm-up rows excluded), fit on the faster row of each
   training pair (the authors' convention, as shipped), MAPE on the 20 % held-out pairs: on
   their faster rows (``hold``) and on both rows of each pair (``hold2``);
2. tp extrapolation: fit tp 1 and tp 2, predict every tp 4 row
   (:func:`planning.cost_model.extrapolate_tp`, and coefficient-wise ``a + b/tp`` for
   comparison);
3. analytic fallback: MAPE of :func:`planning.profile.analytic_profile` against every measured
   (model, tp), calibrated on all models (in-sample) and held out by layer shape (every model
   sharing the held-out model's layer shape, e.g. all five Llama-13B fine-tunes, is removed from
   the calibration; the knee multiplier is kept from the full calibration to save time).

The last two lines are ``mape_holdout_all_rows=<fraction>`` (both rows of each held-out pair)
and ``mape_holdout=<fraction>`` (the faster row only, the authors' convention), pooled over
every (model, tp).
Run: ``PYTHONPATH=. python3 bench/cost_model_accuracy.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from planning.cost_model import (
    StepCostModel,
    coefficients,
    extrapolate_tp,
    fit_step_model,
    relative_errors,
)
from planning.io.profiles import (
    LegacyRecords,
    read_load_times,
    read_model_sizes,
    read_vllm030_latency,
)
from planning.profile import (
    A100_80GB,
    CalibrationSample,
    ModelArch,
    analytic_load_time,
    analytic_step,
    calibrate_analytic,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
SEED = 20250321
TRAIN_FRACTION = 0.8
FLAG_MAPE = 0.20

Key = tuple[str, int]


def split_by_pair(data: LegacyRecords, rng: np.random.Generator) -> np.ndarray:
    """The training pair groups (ids of ``data.pair_group``): a seeded 80 % of them."""
    groups = np.unique(data.pair_group)
    return rng.permutation(groups)[: int(round(TRAIN_FRACTION * len(groups)))]


def holdout_table(
    data: dict[Key, LegacyRecords], both: dict[Key, LegacyRecords]
) -> tuple[np.ndarray, np.ndarray, list[Key]]:
    """Print the hold-out table; return pooled held-out errors and the flagged keys.

    Errors come as (faster row of each held-out pair, both rows of each held-out pair);
    ``both`` is ``data`` read with ``min_of_pairs=False``, whose pair ids are the same.
    """
    print(f"{'model':48s} {'tp':>2s} {'train':>5s} {'test':>5s} {'knee':>5s} {'in':>6s} "
          f"{'hold':>6s} {'hold2':>6s} {'prefill':>7s} {'decode':>6s} {'max':>5s}")  # fmt: skip
    pooled, pooled_both, flagged = [], [], []
    for i, (key, d) in enumerate(sorted(data.items())):
        train_groups = split_by_pair(d, np.random.default_rng([SEED, i]))
        train = np.isin(d.pair_group, train_groups)
        fit = fit_step_model(d.records.take(train))
        err = relative_errors(fit.model, d.records.take(~train))
        test_both = ~np.isin(both[key].pair_group, train_groups)
        err_both = relative_errors(fit.model, both[key].records.take(test_both))
        pre = d.is_prefill[~train]
        pooled.append(err)
        pooled_both.append(err_both)
        if err.mean() > FLAG_MAPE:
            flagged.append(key)
        print(f"{key[0]:48s} {key[1]:2d} {int(train.sum()):5d} {int((~train).sum()):5d} "
              f"{fit.model.knee_tokens:5.0f} {fit.mape:6.3f} {err.mean():6.3f} "
              f"{err_both.mean():6.3f} {_mean(err[pre]):>7s} {_mean(err[~pre]):>6s} "
              f"{err.max():5.2f}")  # fmt: skip
    return np.concatenate(pooled), np.concatenate(pooled_both), flagged


def _mean(x: np.ndarray) -> str:
    return "-" if x.size == 0 else f"{x.mean():.3f}"


def _coefwise(m1: StepCostModel, m2: StepCostModel, tp: int) -> StepCostModel:
    """Each coefficient (and the knee) as a + b/tp through tp 1 and 2, clipped at 0."""
    c1 = np.append(coefficients(m1), m1.knee_tokens)
    c2 = np.append(coefficients(m2), m2.knee_tokens)
    b = (c1 - c2) / 0.5
    c = np.maximum(c1 - b + b / tp, 0.0)
    return StepCostModel(*(float(v) for v in c))


def tp_table(data: dict[Key, LegacyRecords]) -> tuple[float, float]:
    """Print the tp1+tp2 -> tp4 table; return pooled MAPEs (power law, coefficient-wise)."""
    print(f"\n{'model':48s} {'fit tp4':>7s} {'extrap':>7s} {'a+b/tp':>7s}")
    errs, naive = [], []
    for model in sorted({m for m, _ in data}):
        keys = [(model, tp) for tp in (1, 2, 4)]
        if not all(k in data and data[k].is_prefill.any() for k in keys):
            continue
        m1, m2 = (fit_step_model(data[k].records).model for k in keys[:2])
        target = data[keys[2]].records
        e = relative_errors(extrapolate_tp({1: m1, 2: m2}, 4), target)
        n = relative_errors(_coefwise(m1, m2, 4), target)
        own = fit_step_model(target).mape
        errs.append(e)
        naive.append(n)
        print(f"{model:48s} {own:7.3f} {e.mean():7.3f} {n.mean():7.3f}")
    pooled, pooled_naive = np.concatenate(errs).mean(), np.concatenate(naive).mean()
    print(f"{'pooled':48s} {'':7s} {pooled:7.3f} {pooled_naive:7.3f}")
    return float(pooled), float(pooled_naive)


def _shape(arch: ModelArch) -> tuple[int | str, ...]:
    """Layer shape, ignoring vocab and context: models sharing it are one held-out group."""
    return (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.intermediate, arch.mlp)


def analytic_table(data: dict[Key, LegacyRecords], data_dir: Path) -> tuple[float, float]:
    """Print analytic-fallback MAPE per (model, tp); return pooled (in-sample, held-out)."""
    sizes = read_model_sizes(data_dir / "model_sizes.json", default_max_model_len=4096)
    loads = read_load_times(data_dir / "a100_model_load_time.json")
    load_samples = [
        (sizes[m].arch, tp, lt.seconds)
        for (m, tp), lt in sorted(loads.items())
        if m in sizes and lt.machine == "unlabelled" and lt.source.endswith("database.py")
    ]
    samples = {k: CalibrationSample(sizes[k[0]].arch, k[1], d.records) for k, d in data.items()}
    full = calibrate_analytic(list(samples.values()), load_samples, A100_80GB)
    print(f"\n{'model':48s} {'tp':>2s} {'in-sample':>9s} {'held-out':>8s}")
    ins, outs = {}, {}
    for shape in sorted({_shape(s.arch) for s in samples.values()}, key=str):
        others = [s for s in samples.values() if _shape(s.arch) != shape]
        held = calibrate_analytic(
            others, load_samples, A100_80GB, knee_mults=(full.knee_ridge_mult,)
        )
        for key in (k for k, s in samples.items() if _shape(s.arch) == shape):
            s = samples[key]
            ins[key] = relative_errors(analytic_step(s.arch, s.tp, A100_80GB, full), s.records)
            outs[key] = relative_errors(analytic_step(s.arch, s.tp, A100_80GB, held), s.records)
    for key in sorted(samples):
        print(f"{key[0]:48s} {key[1]:2d} {ins[key].mean():9.3f} {outs[key].mean():8.3f}")
    pooled_in = np.concatenate(list(ins.values())).mean()
    pooled_out = np.concatenate(list(outs.values())).mean()
    print(f"{'pooled':48s} {'':2s} {pooled_in:9.3f} {pooled_out:8.3f}")
    print(f"analytic calibration: {full}")
    lt_err = [abs(analytic_load_time(a, tp, full) - sec) / sec for a, tp, sec in load_samples]
    print(f"analytic load time vs {len(lt_err)} measured (in-sample): MAPE {np.mean(lt_err):.3f}")
    return float(pooled_in), float(pooled_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder")
    parser.add_argument("--skip-analytic", action="store_true", help="skip table 3")
    args = parser.parse_args()
    latency_file = args.data / "a100_vllm030_iteration_latency.csv.gz"
    data = read_vllm030_latency(latency_file)
    both = read_vllm030_latency(latency_file, min_of_pairs=False)
    pooled, pooled_both, flagged = holdout_table(data, both)
    tp_pooled, tp_naive = tp_table(data)
    if not args.skip_analytic:
        an_in, an_out = analytic_table(data, args.data)
        print(f"analytic_mape_in_sample={an_in:.4f} analytic_mape_held_out_shape={an_out:.4f}")
    print(f"tp4_extrapolation_mape={tp_pooled:.4f} (coefficient-wise a+b/tp: {tp_naive:.4f})")
    names = ", ".join(f"{m} tp{tp}" for m, tp in flagged) or "none"
    print(f"(model, tp) with hold-out MAPE > {FLAG_MAPE:.0%}: {names}")
    print(f"mape_holdout_all_rows={pooled_both.mean():.4f}")
    print(f"mape_holdout={pooled.mean():.4f}")


if __name__ == "__main__":
    main()
