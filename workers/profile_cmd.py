"""``samullm profile``: measure one model on this machine's vLLM and merge its profile into a file.

Run as ``python -m workers.profile_cmd`` (``samullm profile`` execs it, so the coordinator never
imports vLLM). Steps:

1. Check the inputs before vLLM loads: the model folder (a ``config.json`` naming a causal LM),
   the device (``CPU`` unless ``--gpu`` names a known GPU; it must match this machine) and an
   existing ``--out`` file (same device).
2. Preload vLLM as a worker does before it announces itself, load the engine once, then time
   closing it and loading it again: that is ``load_time_s``, what a worker pays to switch models
   (warm page cache, as the shipped A100 load times).
3. Run a grid of offline batches on that engine with :class:`Recorder` (fixed output lengths
   through ``ignore_eos``): one to many sequences, short to half-context prompts, short to long
   outputs, so the steps are pure prefill, pure decode and mixed (chunked prefill beside decodes).
4. Write the steps (canonical step records, key ``(NAME, tp, device)``), fit the step cost model
   and merge the measured profile into ``--out``, replacing only this (model, tp).

The engine uses the runtime's settings (:func:`workers.engines.vllm_engine.engine_kwargs`, the
device's :func:`planning.estimate.serving_for`), so the profile describes the engines the workers
run. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from planning.cost_model import RECORD_FIELDS, StepRecords, fit_step_model
from planning.estimate import serving_for
from planning.io.profiles import (
    ProfileError,
    read_hf_config,
    read_profiles,
    write_profiles,
    write_step_records,
)
from planning.profile import (
    KNOWN_GPUS,
    GpuSpec,
    ModelArch,
    ModelProfile,
    ProfileSet,
    profile_from_fit,
)
from workers import devices
from workers.engines.base import EngineKey
from workers.engines.vllm_engine import (
    ModelFolderError,
    Recorder,
    StepRecord,
    build_engine,
    check_model_folder,
    effective_config,
    engine_kwargs,
    shutdown,
)

log = logging.getLogger(__name__)

DESCRIPTION = "Measure one model on this machine's vLLM and merge its profile into a file."
PROG = "samullm profile"
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")  # vLLM's --dtype choices
FIRST_TOKEN_ID = 3  # prompts use ids 3..vocab-1: no BOS/EOS/PAD in the tiny test tokenizers


class CliError(Exception):
    """A user error: one line on stderr, exit code 2."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One offline batch of the grid: every request is added before the first step."""

    num_seqs: int  # requests
    prompt_len: int  # tokens; each request draws its prompt from [prompt_len // 2, prompt_len]
    output_len: int  # tokens; each request draws its output from [output_len // 2, output_len]

    def requests(self, rng: np.random.Generator, vocab: int) -> tuple[list[list[int]], list[int]]:
        """Random prompt token ids and fixed output lengths (the draws spread the finishes)."""
        plens = rng.integers(max(1, self.prompt_len // 2), self.prompt_len + 1, self.num_seqs)
        olens = rng.integers(max(1, self.output_len // 2), self.output_len + 1, self.num_seqs)
        prompts = [rng.integers(FIRST_TOKEN_ID, vocab, int(n)).tolist() for n in plens]
        return prompts, [int(o) for o in olens]


def grid(kind: str, max_model_len: int, max_num_seqs: int) -> list[Batch]:
    """The batches of a grid; outputs are cut so that prompt + output fits the context.

    Three kinds of batch: 1-token outputs (pure prefill steps, 1 to 64 prompts), longer outputs
    (mostly pure decode steps, 1 to 64 sequences, contexts up to the limit) and more requests
    than ``max_num_seqs`` with staggered outputs (the waiting ones are admitted while the others
    decode: mixed steps). ``quick`` keeps about 8k prefill tokens and 250 decode steps (a few
    seconds for the test models on one core); ``full`` spans 1..256 sequences, prompts of
    16 x 4^k tokens up to half the context and outputs up to half the context.
    """
    half = max(16, max_model_len // 2)
    crowd = max_num_seqs + max(1, max_num_seqs // 4)  # sequences; more than fit in one step
    if kind == "quick":
        prefill = [Batch(1, 16, 1), Batch(1, half, 1), Batch(4, 64, 1), Batch(8, half, 1),
                   Batch(16, half, 1)]  # fmt: skip
        tail = max(1, max_model_len // 4)  # tokens of output that reach the context limit
        decode = [Batch(1, 16, 32), Batch(8, half, 32), Batch(32, 16, 32),
                  Batch(2, max_model_len - tail, tail)]  # fmt: skip
        mixed = [Batch(crowd, 8, 32)]
    else:
        seqs = tuple(2**i for i in range(9))
        prompts = tuple(sorted({*(p for p in (16, 64, 256, 1024, 4096) if p < half), half}))
        prefill = [Batch(n, p, 1) for n in seqs for p in prompts]
        decode = [Batch(n, p, o) for n in seqs for p in prompts for o in (16, 128)]
        decode += [Batch(n, p, half) for n in (1, 8, 64) for p in (32, half)]
        mixed = [Batch(crowd, p, 64) for p in (16, 64, half)]
    batches = prefill + decode + mixed
    return [replace(b, output_len=max(1, min(b.output_len, max_model_len - b.prompt_len)))
            for b in batches if b.prompt_len < max_model_len]  # fmt: skip


def blocks_needed(batches: Sequence[Batch], block_size: int) -> int:
    """KV blocks (vLLM's null block included) for the largest batch at once: no preemption."""
    per = [b.num_seqs * math.ceil((b.prompt_len + b.output_len) / block_size) for b in batches]
    return max(per) + 1


def fit_capacity(batches: Sequence[Batch], capacity: int) -> list[Batch]:
    """Batches with fewer sequences where all of them would not fit in ``capacity`` KV tokens."""
    out = []
    for b in batches:
        n = min(b.num_seqs, capacity // (b.prompt_len + b.output_len))
        if n >= 1:
            out.append(replace(b, num_seqs=n))
    return out


# --------------------------------------------------------------------------------------------
# Command line and checks (nothing here loads vLLM).
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of ``samullm profile``."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--model", required=True, help="local model folder (config.json + weights)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices)")
    p.add_argument("--name", help="model id in the profile file (default: the folder's name)")
    p.add_argument("--out", type=Path, default=Path("profiles.json"),
                   help="profile file to write or merge into (default: profiles.json)")
    p.add_argument("--records", type=Path,
                   help="step records CSV (default: beside --out, <out>.<name>.tp<N>.records.csv)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--max-model-len", type=int, default=512, help="tokens (default: 512)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default: the device's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per batch; each step keeps its fastest run (default: 1)")
    p.add_argument("--grid", choices=("quick", "full"), default="quick")
    p.add_argument("--gpu", default="CPU", help=f"device type, one of {', '.join(KNOWN_GPUS)}")
    p.add_argument("--devices", help="device indices to run on, e.g. 0,1 (default: 0..tp-1); "
                   "on CPU a device is --cores-per-device host cores, as in samullm worker")
    p.add_argument("--cores-per-device", type=int, default=1, help="CPU: host cores per device")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    args = p.parse_args(argv)
    for name in ("tp", "max_model_len", "repeats", "cores_per_device"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    try:
        ids = range(args.tp) if args.devices is None else [int(d) for d in args.devices.split(",")]
    except ValueError:
        p.error(f"--devices: expected comma-separated integers, got {args.devices!r}")
    if len(ids) != args.tp or len(set(ids)) != len(ids) or min(ids) < 0:
        p.error(f"--devices: expected {args.tp} distinct indices >= 0, got {args.devices}")
    args.devices = tuple(ids)
    return args


@dataclass(frozen=True, slots=True)
class Target:
    """What is measured, checked before vLLM loads."""

    name: str  # model id in the profile file
    path: str  # local model folder
    tp: int  # tensor-parallel degree, devices
    gpu: GpuSpec  # device type
    arch: ModelArch  # shape from config.json, max_model_len = the measured context
    records: Path  # where the step records go
    block_size: int  # tokens per KV block


def check(args: argparse.Namespace) -> Target:
    """Validate the model folder, device and output files; build the :class:`Target`.

    Raises:
        CliError: with a one-line message naming the path or value at fault.
    """
    path = check_model(args.model)
    try:
        arch = read_hf_config(path, max_model_len=args.max_model_len)
    except ProfileError as e:
        raise CliError(str(e)) from None
    name = args.name or Path(path).name
    gpu = _device(args.gpu)
    try:
        arch.check_tp(args.tp, name)
    except ValueError as e:
        raise CliError(str(e)) from None
    _existing(args.out, gpu)  # fail before measuring
    records = args.records or args.out.with_name(
        f"{args.out.stem}.{_slug(name)}.tp{args.tp}.records.csv"
    )
    for f in (args.out, records):
        if not f.parent.is_dir():
            raise CliError(f"{f}: folder {f.parent} does not exist")
    block = args.block_size or serving_for(gpu.name).block_size
    return Target(name, path, args.tp, gpu, arch, records, block)


def check_model(model: str) -> str:
    """The absolute path of a local folder holding a causal LM (``config.json``), before vLLM.

    Raises:
        CliError: no such folder, no or unreadable config.json, not a causal LM (names the path).
    """
    if not Path(model).is_dir():
        raise CliError(f"model path {model}: no such folder")
    path = str(Path(model).resolve())
    try:
        check_model_folder(path)
    except ModelFolderError as e:
        raise CliError(str(e).replace(path, model, 1)) from None
    return path


def _device(name: str) -> GpuSpec:
    """The device type: known, and the kind this machine has."""
    if name not in KNOWN_GPUS:
        raise CliError(f"--gpu {name!r}: unknown device type; known: {', '.join(KNOWN_GPUS)}")
    kind = devices.detect_kind()
    if (kind == "cuda") != (name != "CPU"):
        have = "NVIDIA GPUs (name their type with --gpu)" if kind == "cuda" else "no NVIDIA GPU"
        raise CliError(f"--gpu {name}: this machine has {have}")
    return KNOWN_GPUS[name]


def _existing(out: Path, gpu: GpuSpec) -> ProfileSet | None:
    """The profile file to merge into, or None; it must be for the same device type."""
    if not out.exists():
        return None
    try:
        ps = read_profiles(out)
    except ProfileError as e:
        raise CliError(f"--out: {e}") from None
    if ps.gpu.name != gpu.name:
        raise CliError(
            f"--out {out}: the file holds {ps.gpu.name} profiles, this one is for {gpu.name}; "
            "write it to another file"
        )
    return ps


def _slug(name: str) -> str:
    """``name`` as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --------------------------------------------------------------------------------------------
# Measurement (loads vLLM).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one profiling run measured."""

    steps: list[StepRecord]  # every recorded step (fastest run per step with --repeats > 1)
    cold_load_s: float  # s, first engine of the process (after the worker's preload)
    load_s: float  # s, closing the first engine and loading a second one (a model switch)


def engine_key(t: Target, args: argparse.Namespace, batches: Sequence[Batch]) -> EngineKey:
    """The runtime's engine settings for the device, with a KV pool that holds every batch."""
    s = serving_for(t.gpu.name)
    blocks = blocks_needed(batches, t.block_size) if t.gpu.name == "CPU" else None
    return EngineKey(
        model=t.name, path=t.path, tp=t.tp, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=s.gpu_memory_utilization, dtype=args.dtype,
        block_size=t.block_size, num_kv_blocks=blocks, seed=args.seed,
    )  # fmt: skip


def measure(t: Target, args: argparse.Namespace) -> Measurement:
    """Load twice and record the grid on the second engine.

    As in a worker: vLLM is preloaded first (a worker does it before it announces itself), the
    first engine's build is ``cold``, and ``load`` is a model switch: closing the previous
    engine (vLLM's shutdown and collection, about 1 s on CPU) plus building this one.
    """
    from workers.engines.vllm_engine import VllmEngine, preload

    s = serving_for(t.gpu.name)
    batches = grid(args.grid, args.max_model_len, s.max_num_seqs)
    key = engine_key(t, args, batches)
    kwargs = engine_kwargs(key)
    preload()
    first = VllmEngine(key)
    cold = first.load_s
    t0 = time.perf_counter()
    first.close()
    engine = build_engine(t.path, kwargs)
    load = time.perf_counter() - t0
    try:
        cfg = effective_config(engine)
        batches = fit_capacity(batches, cfg.num_kv_blocks * cfg.block_size)
        steps = record(Recorder(engine), batches, args.repeats, t.arch.vocab, args.seed)
    finally:
        shutdown(engine)
    return Measurement(steps, cold, load)


def record(
    rec: Recorder, batches: Sequence[Batch], repeats: int, vocab: int, seed: int
) -> list[StepRecord]:
    """Warm up, then run every batch ``repeats`` times (interleaved) and return the steps.

    A batch's repeats schedule identically, so each step keeps its fastest run (the machine's
    uncontended speed: other processes only ever slow a step down).
    """
    warm = Batch(8, 64, 8).requests(np.random.default_rng(seed + 99), vocab)
    rec.run(*warm)  # NOTE(profile): first-call kernel set-up stays out of the records
    work = [b.requests(np.random.default_rng(seed + i), vocab) for i, b in enumerate(batches)]
    runs: list[list[list[StepRecord]]] = [[] for _ in batches]
    for _ in range(repeats):
        for i, (prompts, outs) in enumerate(work):
            runs[i].append(rec.run(prompts, outs).steps)
    return [st for r in runs for st in fastest(r)]


def fastest(runs: Sequence[Sequence[StepRecord]]) -> list[StepRecord]:
    """Each step with its minimum latency over ``runs``; all steps when the schedules differ."""

    def shape(r: Sequence[StepRecord]) -> list[tuple[int, int, int]]:
        return [(s.prefill_tokens, s.num_seqs, s.context_tokens) for s in r]

    if any(shape(r) != shape(runs[0]) for r in runs[1:]):
        log.warning("repeats scheduled differently; keeping every run's steps")
        return [s for r in runs for s in r]
    lat = np.array([[s.latency_s for s in r] for r in runs]).min(axis=0)
    return [replace(s, latency_s=float(x)) for s, x in zip(runs[0], lat, strict=True)]


def to_records(steps: Sequence[StepRecord]) -> StepRecords:
    """The cost model's array form of recorded steps."""
    cols = [np.array([getattr(s, f) for s in steps], dtype=np.float64) for f in RECORD_FIELDS]
    return StepRecords(*cols)


# --------------------------------------------------------------------------------------------
# Fit, merge, report.
# --------------------------------------------------------------------------------------------


def merged(t: Target, profile: ModelProfile, out: Path) -> ProfileSet:
    """The profile file as it is now (if any) with this (model, tp) replaced.

    The file is read again (it was checked before measuring): another run may have written it
    meanwhile.
    """
    old = _existing(out, t.gpu)
    if old is None:
        return ProfileSet(t.gpu, {(t.name, t.tp): profile}, {t.name: t.arch})
    profiles = {**old.profiles, (t.name, t.tp): profile}
    return ProfileSet(old.gpu, profiles, {**old.archs, t.name: t.arch}, old.calib)


def run(args: argparse.Namespace) -> int:
    """Check, measure, fit, write; returns the exit code."""
    try:
        t = check(args)
        place = devices.place(args.devices, "cpu" if t.gpu.name == "CPU" else "cuda",
                              args.cores_per_device)  # fmt: skip
    except (CliError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    devices.apply(place)
    try:
        m = measure(t, args)
        records = to_records(m.steps)
        fit = fit_step_model(records)
        profile = profile_from_fit(t.name, t.tp, t.gpu, fit, t.arch, load_time_s=m.load_s)
        write_step_records(t.records, {(t.name, t.tp, t.gpu.name): records})
        write_profiles(args.out, merged(t, profile, args.out), notes={"generator": PROG})
    except (CliError, ProfileError, ValueError, OSError) as e:  # e.g. vLLM refusing a setting
        log.debug("profile failed", exc_info=True)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    _print(t, m, fit.mape, args.out)
    return 0



def _print(t: Target, m: Measurement, mape: float, out: Path) -> None:
    print(f"{'model':32s} {'tp':>2s} {'device':>10s} {'load_s':>7s} {'cold_s':>7s} "
          f"{'mape':>6s} {'steps':>6s}")  # fmt: skip
    print(f"{t.name:32s} {t.tp:2d} {t.gpu.name:>10s} {m.load_s:7.2f} {m.cold_load_s:7.2f} "
          f"{mape:6.3f} {len(m.steps):6d}")  # fmt: skip
    print(f"wrote profile to {out}, step records to {t.records}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m workers.profile_cmd``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # NOTE(profile): vLLM's INFO lines would bury the result table; set it to see them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
