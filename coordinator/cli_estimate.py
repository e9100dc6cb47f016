"""``samullm estimate``: how long one model takes on a request set, for each parallelism.

Samples output lengths from the model's distribution, simulates vLLM V1 batching with the
model's fitted step cost model, and prints P50/P90 serving time per (tp, dp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.settings import load_settings
from planning.estimate import ServingConfig, engine_for, estimate_serving_time
from planning.length_dist import LengthDistribution
from planning.profile import ModelArch, ProfileSet, UnknownModelError


class CliError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def register(sub: Any) -> None:
    """Add the ``estimate`` sub-command."""
    p = sub.add_parser("estimate", help="serving-time estimate of one model (P50/P90)")
    p.add_argument("--model", required=True, help="Hugging Face id, e.g. lmsys/vicuna-13b-v1.5")
    p.add_argument("--tp", type=_int_list, help="tensor-parallel degrees, e.g. 1,2,4")
    p.add_argument("--dp", type=int, default=None, help="replicas (default: gpus // tp)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: tp x dp)")
    p.add_argument("--requests", type=int, default=1000, help="requests (with --prompt-len)")
    p.add_argument("--prompt-len", type=int, default=200, help="tokens per prompt")
    p.add_argument("--prompt-lens", type=Path, help="file: one prompt length per line or CSV")
    p.add_argument("--max-tokens", type=int, default=None, help="output cap per request")
    p.add_argument("--profiles", type=Path, help="profile file (default: shipped A100 set)")
    p.add_argument("--config", type=Path,
                   help="Hugging Face config.json (or its folder) for a model with no profile: "
                        "the analytic roofline calibrated on the measured models is used")
    p.add_argument("--lengths", type=Path, help="length distribution or the authors' pmf file")
    p.add_argument("--draws", type=int, default=8, help="independent length samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("v1", "legacy030"), default="v1", help="vLLM scheduler")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-load", action="store_true", help="leave engine load time out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``samullm estimate``; returns the exit code."""
    try:
        rows = _estimate(args)
    except (CliError, UnknownModelError, ValueError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, UnknownModelError) and exc.args else exc
        print(f"samullm estimate: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "estimates": rows}, indent=2))
    else:
        _print_table(args.model, rows)
    return 0


def _estimate(args: argparse.Namespace) -> list[dict[str, Any]]:
    profiles = _load_profiles(args.profiles)
    arch = _load_arch(args.config)
    dist = _load_lengths(args.lengths, args.model)
    prompts = _prompt_lengths(args)
    serving = ServingConfig(
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        mode=args.mode,
    )
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise CliError(f"--max-tokens must be positive, got {args.max_tokens}")
    rows = []
    for tp, dp in _parallelisms(args):
        profile = profiles.resolve(args.model, tp, arch=arch)
        try:
            engine = engine_for(profile, profiles.gpu, serving)
        except ValueError as exc:
            if args.tp is not None:  # asked for explicitly: a real error
                raise
            print(f"skipping tp={tp}: {exc}", file=sys.stderr)
            continue
        if engine.num_kv_blocks * engine.block_size < int(prompts.max()) + 1:
            msg = f"tp={tp}: KV cache holds {engine.num_kv_blocks} blocks, too few for a prompt"
            if args.tp is not None:
                raise CliError(msg)
            print(f"skipping {msg}", file=sys.stderr)
            continue
        rng = np.random.default_rng(args.seed)  # same draws for every parallelism
        began = time.perf_counter()
        est = estimate_serving_time(
            prompts, dist, profile, engine, rng, dp=dp, draws=args.draws,
            max_tokens=args.max_tokens, include_load=not args.no_load,
        )
        rows.append({
            "tp": tp, "dp": dp, "gpus": tp * dp, "profile": profile.source,
            "kv_blocks_per_replica": engine.num_kv_blocks, "load_s": est.load_s,
            "p50_s": est.p50_s, "p90_s": est.p90_s, "mean_s": est.mean_s,
            "mean_output_tokens": est.mean_output_tokens, "requests": int(prompts.size),
            "estimate_seconds": time.perf_counter() - began,
        })
    if not rows:
        raise CliError(f"{args.model} fits at none of the tps tried")
    return rows


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parallelisms(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.tp is None:
        if args.gpus is None:
            raise CliError("give --tp, or --gpus to try every power-of-two tp that fits")
        tps = [t for t in (1, 2, 4, 8) if t <= args.gpus]
    else:
        tps = args.tp
    out = []
    for tp in tps:
        dp = args.dp if args.dp is not None else max(1, (args.gpus or tp) // tp)
        if dp <= 0 or (args.gpus is not None and tp * dp > args.gpus):
            raise CliError(f"--tp {tp} x --dp {dp} exceeds --gpus {args.gpus}")
        out.append((tp, dp))
    return out


def _load_profiles(path: Path | None) -> ProfileSet:
    from planning.io.profiles import load_default_profiles, read_profiles

    return load_default_profiles() if path is None else read_profiles(path)


def _load_arch(path: Path | None) -> ModelArch | None:
    from planning.io.profiles import read_hf_config

    return None if path is None else read_hf_config(path)


def _load_lengths(path: Path | None, model: str) -> LengthDistribution:
    from planning.io.lengths import load_authors_pdfs, load_distribution

    if path is None:
        path = load_settings().default_lengths
        if not path.exists():
            raise CliError(f"no --lengths given and the default {path} does not exist")
    try:
        head = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not JSON ({exc})") from exc
    if isinstance(head, dict) and head.get("format", "").startswith("samullm.lengths/"):
        return load_distribution(path)
    pdfs = load_authors_pdfs(path)
    if model not in pdfs:
        why = pdfs.skipped.get(model) or pdfs.skipped.get(model.split("/")[-1])
        raise CliError(f"{path}: no length distribution for {model!r}" + (f" ({why})" if why
                                                                        else ""))
    return pdfs[model]


def _prompt_lengths(args: argparse.Namespace) -> np.ndarray:
    if args.prompt_lens is None:
        if args.requests <= 0 or args.prompt_len <= 0:
            raise CliError("--requests and --prompt-len must be positive")
        return np.full(args.requests, args.prompt_len, dtype=np.int64)
    values = []
    lines = args.prompt_lens.read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        cell = line.split(",")[0].strip()
        if not cell or (lineno == 1 and cell == "prompt_len"):
            continue
        if not cell.isdigit() or int(cell) <= 0:
            raise CliError(f"{args.prompt_lens}:{lineno}: prompt_len {cell!r} is not a "
                           "positive integer")
        values.append(int(cell))
    if not values:
        raise CliError(f"{args.prompt_lens}: no prompt lengths")
    return np.asarray(values, dtype=np.int64)


def _print_table(model: str, rows: list[dict[str, Any]]) -> None:
    n = rows[0]["requests"] if rows else 0
    print(f"{model}: {n} requests (P50/P90 over length draws, load time included)")
    print(f"{'tp':>3} {'dp':>3} {'profile':<28} {'KV blocks':>10} {'load s':>7} "
          f"{'P50 s':>9} {'P90 s':>9} {'out tok':>8}")
    for r in rows:
        print(f"{r['tp']:>3} {r['dp']:>3} {r['profile']:<28} {r['kv_blocks_per_replica']:>10} "
              f"{r['load_s']:>7.1f} {r['p50_s']:>9.1f} {r['p90_s']:>9.1f} "
              f"{r['mean_output_tokens']:>8.1f}")
    best = min(rows, key=lambda r: r["p50_s"])
    print(f"fastest: tp={best['tp']} dp={best['dp']} ({best['p50_s']:.1f} s P50)")
