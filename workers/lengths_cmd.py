"""``samullm lengths``: observe a model's output lengths on a prompt set and fit their distribution.

Run as ``python -m workers.lengths_cmd`` (``samullm lengths`` execs it, so the coordinator never
imports vLLM). It samples prompts from a dataset (a ``prompt`` column, in the row formats of
application datasets: docs/app-spec.md §4), generates for real on the workers' vLLM engine
(:class:`workers.engines.vllm_engine.VllmEngine`: stop at EOS, at ``--max-tokens`` or at the
context limit), writes one observation per request in the format of
:func:`planning.io.lengths.load_observations` (``finished`` = stopped by EOS; the others are
censored) and fits the Kaplan-Meier distribution the planner samples from
(:meth:`planning.length_dist.LengthDistribution.from_observations`). An application file uses
the result with ``lengths: <file>``. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apps.cluster_spec import SpecError
from apps.datasets import dataset_rows
from planning.estimate import serving_for
from planning.io.files import atomic_write_text
from planning.io.lengths import LengthDataError, load_observations, save_distribution
from planning.io.profiles import ProfileError, read_hf_config
from planning.length_dist import LengthDistribution, LengthObservations
from workers import devices
from workers.engines.base import EngineKey, EngineRequest, StepUpdate
from workers.profile_cmd import DTYPES, CliError, check_model

log = logging.getLogger(__name__)

DESCRIPTION = "Observe a model's output lengths on a prompt set and fit their distribution."
PROG = "samullm lengths"


# --------------------------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[str]:
    """The ``prompt`` text of every row of a .csv, .jsonl or .json (list) file (.gz allowed).

    Raises:
        CliError: missing file, unknown format, bad JSON, a row without prompt text, no rows;
            the message names the file and the line (JSON lists: the entry index).
    """
    try:
        rows = dataset_rows(path)
    except SpecError as e:
        raise CliError(f"--prompts {e}") from None
    prompts = [_prompt(row, label) for label, row in rows]
    if not prompts:
        raise CliError(f"--prompts {path}: no rows")
    return prompts


def _prompt(row: Any, label: str) -> str:
    if not isinstance(row, dict):
        raise CliError(f"{label}: expected an object, got {type(row).__name__}")
    text = row.get("prompt")
    if not isinstance(text, str) or not text:
        raise CliError(f"{label}: column 'prompt': expected non-empty text, got {text!r}")
    return text


def sample_prompts(prompts: Sequence[str], n: int | None, seed: int) -> list[str]:
    """``n`` prompts drawn without replacement (seeded), in file order; all when ``n`` is None."""
    if n is None or n >= len(prompts):
        return list(prompts)
    idx = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    return [prompts[int(i)] for i in idx]


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """One generated request."""

    prompt_len: int  # tokens the engine saw (chat template applied, cut to the context)
    output_len: int  # tokens generated
    finished: bool  # stopped by EOS; False: cut by max tokens or the context (censored)


def engine_key(name: str, path: str, args: argparse.Namespace, device: str) -> EngineKey:
    """The workers' engine settings on one device (``device``: "CPU" or any GPU name)."""
    s = serving_for(device)
    return EngineKey(
        model=name, path=path, tp=1, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=s.gpu_memory_utilization, dtype=args.dtype,
        block_size=s.block_size, num_kv_blocks=None, chat_template=args.chat_template,
        seed=args.seed,
    )  # fmt: skip


def generate(
    key: EngineKey, prompts: Sequence[str], limit: int, args: argparse.Namespace
) -> list[Observation]:
    """Run every prompt to EOS, max tokens or the context limit (``limit`` tokens)."""
    from workers.engines.vllm_engine import VllmEngine

    engine = VllmEngine(key)
    try:
        prompt_lens: dict[str, int] = {}
        for i, text in enumerate(prompts):
            # NOTE(lengths): prompt_ids is VllmEngine's own tokenization (chat template
            # included); the engine keeps the last limit - 1 tokens of a longer prompt.
            n = min(len(engine.prompt_ids(text)), limit - 1)
            req = EngineRequest(f"lengths/{i}", text, n, args.max_tokens, args.temperature,
                                args.top_p)  # fmt: skip
            engine.add_request(req)
            prompt_lens[req.key] = n
        done: dict[str, StepUpdate] = {}
        while engine.has_unfinished_requests():
            done.update((u.key, u) for u in engine.step() if u.finished)
    finally:
        engine.close()
    return [Observation(prompt_lens[k], max(1, done[k].tokens), done[k].finish_reason == "stop")
            for k in prompt_lens]  # fmt: skip


def write_observations(path: Path, obs: Sequence[Observation], model: str) -> None:
    """CSV with ``prompt_len,output_len,finished,model`` (atomic)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt_len", "output_len", "finished", "model"])
    w.writerows([o.prompt_len, o.output_len, str(o.finished).lower(), model] for o in obs)
    atomic_write_text(path, buf.getvalue())


def fit(obs: LengthObservations, max_tokens: int) -> LengthDistribution:
    """Kaplan-Meier over 1..``max_tokens`` (what lies beyond is unknown: the last bin)."""
    top = max(max_tokens, int(obs.output_len.max()))
    return LengthDistribution.from_observations(
        obs.prompt_len, obs.output_len, obs.finished, max_len=top
    )


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of ``samullm lengths``."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--model", required=True, help="local model folder (config.json + weights)")
    p.add_argument("--prompts", required=True, type=Path,
                   help="dataset with a 'prompt' column: .csv, .jsonl or .json (.gz ok)")
    p.add_argument("--name", help="model id in the observations (default: the folder's name)")
    p.add_argument("--sample", type=int, help="prompts to draw (default: all)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw and sampling")
    p.add_argument("--chat-template", choices=("auto", "required", "off"), default="auto")
    p.add_argument("--max-model-len", type=int, help="tokens (default: the model's)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--observations", type=Path,
                   help="observations CSV (default: beside --out, <out>.observations.csv)")
    p.add_argument("--out", type=Path, help="distribution file (default: <name>.lengths.json)")
    args = p.parse_args(argv)
    for opt in ("sample", "max_tokens", "max_model_len"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            p.error(f"--{opt.replace('_', '-')}: must be >= 1")
    if not (args.temperature >= 0 and 0 < args.top_p <= 1):
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def context_limit(path: str, max_model_len: int | None) -> int:
    """Tokens of context the engine serves: ``--max-model-len``, else the model's config."""
    try:
        return read_hf_config(path, max_model_len=max_model_len).max_model_len
    except ProfileError as e:
        raise CliError(str(e)) from None


def _outputs(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """The distribution and observation files; their folders must exist."""
    out: Path = args.out or Path(f"{name}.lengths.json")
    obs: Path = args.observations or out.with_name(f"{out.stem}.observations.csv")
    for f in (out, obs):
        if not f.parent.is_dir():
            raise CliError(f"{f}: folder {f.parent} does not exist")
    return out, obs


def run(args: argparse.Namespace) -> int:
    """Check, generate, write, fit; returns the exit code."""
    try:
        path = check_model(args.model)
        limit = context_limit(path, args.max_model_len)
        name = args.name or Path(path).name
        out, obs_path = _outputs(args, name)
        prompts = sample_prompts(read_prompts(args.prompts), args.sample, args.seed)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # NOTE(lengths): not pinned to one device's cores (only lengths matter here, not timings)
    key = engine_key(name, path, args, "CPU" if devices.detect_kind() == "cpu" else "GPU")
    try:
        observed = generate(key, prompts, limit, args)
        write_observations(obs_path, observed, name)
        obs = load_observations(obs_path)
        dist = fit(obs, args.max_tokens)
        save_distribution(out, dist)
    except (ValueError, LengthDataError, OSError) as e:  # a refused chat template, bad sizes
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    _print(obs, dist, obs_path, out)
    return 0


def _print(obs: LengthObservations, dist: LengthDistribution, obs_path: Path, out: Path) -> None:
    n = int(obs.output_len.size)
    print(f"{n} requests, {float(obs.finished.mean()):.0%} finished by EOS, observed mean "
          f"{float(obs.output_len.mean()):.1f} tokens")  # fmt: skip
    print(f"fitted (Kaplan-Meier): mean {dist.mean():.1f}, P50 {dist.quantile(0.5)}, "
          f"P90 {dist.quantile(0.9)} tokens (max {dist.max_len})")  # fmt: skip
    print(f"wrote observations to {obs_path}, distribution to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m workers.lengths_cmd``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # see workers.profile_cmd.main
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
