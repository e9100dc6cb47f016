"""End to end on real vLLM (CPU build): profile, lengths, plan, run; our plan vs the sequential one.

Builds three random Llamas of different sizes (``tests/tiny_model.py``: tiny, small, mid) in a
work folder beside a copy of ``examples/real-vllm/app.yaml`` and its questions, then runs the
user's workflow with the ``samullm`` CLI:

1. ``samullm profile`` per model (pinned to one core, as a CPU device is) into one profile file;
2. ``samullm lengths`` per model over the questions (real sampling, EOS or max tokens);
3. ``samullm run APP --cluster examples/clusters/cpu2.yaml --profiles ... --json`` with our plan
   and with ``--method sequential``, each a real run on two vLLM workers (one core each).

It prints the planned-vs-actual table of each run, and the measured speedup of our plan over the
sequential one. Figures: docs/real-vllm.md. Run from the repository root::

    .venv/bin/python bench/real_vllm_e2e.py [--work .cache/real-vllm] [--grid quick|full]

The last line is ``speedup=<x> max_makespan_error=<fraction>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny_model import build  # noqa: E402

MODELS = ("mid", "small", "tiny")  # model id == tiny_model shape
MAX_TOKENS = {"mid": 96, "small": 96, "tiny": 48}  # tokens, as in the app's sampling
CLUSTER = ROOT / "examples" / "clusters" / "cpu2.yaml"
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
}  # fmt: skip


def _samullm(*args: str, core: int | None = None) -> str:
    """Run ``samullm ARGS`` (optionally pinned to one core); its stdout. Fails loudly."""
    argv = [sys.executable, "-m", "coordinator.cli", *args]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    env = {**os.environ, **ENV, "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm")}
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"samullm {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")  # fmt: skip
    print(f"  samullm {args[0]} {args[1:3]} ... {time.perf_counter() - t0:.1f} s", flush=True)
    return done.stdout


def prepare(work: Path, grid: str, repeats: int) -> None:
    """Models, app copy, profiles and lengths in ``work``."""
    for sub in ("data", "lengths"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "real-vllm" / "app.yaml", work / "app.yaml")
    shutil.copy(ROOT / "examples" / "runtime" / "data" / "questions.jsonl", work / "data")
    profiles = work / "profiles.json"
    profiles.unlink(missing_ok=True)
    for name in MODELS:
        model = build(work / "models" / name, name)
        _samullm("profile", "--model", str(model), "--tp", "1", "--name", name,
                 "--out", str(profiles), "--records", str(work / f"steps-{name}.csv"),
                 "--grid", grid, "--repeats", str(repeats), core=0)  # fmt: skip
        _samullm("lengths", "--model", str(model), "--prompts", str(work / "data" /
                 "questions.jsonl"), "--name", name, "--max-tokens", str(MAX_TOKENS[name]),
                 "--observations", str(work / "lengths" / f"{name}-obs.csv"),
                 "--out", str(work / "lengths" / f"{name}.json"), core=0)  # fmt: skip


def run(work: Path, method: str) -> dict[str, Any]:
    """One real run of the app with ``method``; the run's JSON summary."""
    out = _samullm("run", str(work / "app.yaml"), "--cluster", str(CLUSTER), "--profiles",
                   str(work / "profiles.json"), "--method", method, "--json",
                   "--out", str(work / f"results-{method}.jsonl"),
                   "--log-dir", str(work / f"logs-{method}"))  # fmt: skip
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if summary.get("status") != "done":
        raise SystemExit(f"{method}: job {summary.get('status')}: {summary.get('error')}")
    return summary


def report(method: str, s: dict[str, Any]) -> float:
    """Print one run's planned-vs-actual table; its makespan error (fraction)."""
    pva = s["planned_vs_actual"]
    job = pva["job"]
    print(f"\n{method}: {s['outputs_committed']}/{s['requests_total']} outputs, "
          f"planned P50 {job['planned_p50_s']:.2f} s (P90 {job['planned_p90_s']:.2f} s), "
          f"actual {job['actual_s']:.2f} s, error {job['error_pct']:+.1f} %")  # fmt: skip
    print(f"  {'model':<8} {'planned s':>13} {'actual s':>13} {'error':>8}")
    for m in pva["models"]:
        err = m.get("error_pct")
        print(f"  {m['model']:<8} {m['planned_start_s']:6.2f}-{m['planned_end_s']:<6.2f} "
              f"{m['actual_start_s']:6.2f}-{m['actual_end_s']:<6.2f} "
              f"{'-' if err is None else f'{err:+.1f} %':>8}")  # fmt: skip
    return abs(float(job["error_pct"])) / 100.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "real-vllm")
    p.add_argument("--grid", choices=("quick", "full"), default="quick")
    p.add_argument("--repeats", type=int, default=3, help="profile: runs per batch (fastest kept)")
    p.add_argument("--skip-prepare", action="store_true", help="reuse models, profiles, lengths")
    args = p.parse_args()
    if not args.skip_prepare:
        print(f"preparing {args.work} (models, profiles, lengths)")
        prepare(args.work, args.grid, args.repeats)
    runs = {m: run(args.work, m) for m in ("samullm", "sequential")}
    errors = [report(m, s) for m, s in runs.items()]
    ours, seq = (runs[m]["planned_vs_actual"]["job"] for m in ("samullm", "sequential"))
    speedup = seq["actual_s"] / ours["actual_s"]
    planned = seq["planned_p50_s"] / ours["planned_p50_s"]
    print(f"\nspeedup of our plan over sequential: actual {speedup:.2f}x, planned {planned:.2f}x")
    print(f"speedup={speedup:.3f} max_makespan_error={max(errors):.3f}")


if __name__ == "__main__":
    main()
