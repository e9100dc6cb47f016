"""``samullm run`` on a CPU cluster drives real vLLM workers end to end (CPU build).

The user's command, as a subprocess: a private Redis, the coordinator and one ``--engine vllm``
worker per CPU device start, a two-model application (two random Llamas of different sizes,
the second consuming the first's outputs) is planned from a profile file and runs; every output
is committed once with the exact length asked for (``ignore_eos``), and the summary holds the
planned-vs-actual record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planning.cost_model import StepCostModel
from planning.io.lengths import save_distribution
from planning.io.profiles import profiles_to_json, read_hf_config
from planning.length_dist import LengthDistribution
from planning.profile import CPU_DEVICE, ModelProfile, ProfileSet

pytestmark = pytest.mark.vllm_cpu
ROOT = Path(__file__).resolve().parents[2]
STEP = StepCostModel(3e-3, 2e-5, 0.0, 2e-5, 1e-8, 0.0, 4096.0)  # a rough CPU step, s


def _profile(name: str, folder: str) -> ModelProfile:
    arch = read_hf_config(folder)
    return ModelProfile(
        model=name, tp=1, gpu="CPU", step=STEP, load_time_s=3.0,
        weight_bytes_per_gpu=int(arch.weight_bytes_per_gpu(1)),
        kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token_per_gpu(1), max_model_len=2048,
        source="measured", fit_mape=None,
    )  # fmt: skip


def _write_app(tmp: Path, tiny: str, small: str) -> Path:
    ps = ProfileSet(CPU_DEVICE, {("tiny", 1): _profile("tiny", tiny),
                                 ("small", 1): _profile("small", small)})  # fmt: skip
    (tmp / "profiles.json").write_text(profiles_to_json(ps))
    save_distribution(tmp / "len.json", LengthDistribution.from_pmf(np.full(32, 1 / 32)))
    models = [{"id": n, "path": p, "profile": "measured", "lengths": "len.json",
               "max_model_len": 512} for n, p in (("tiny", tiny), ("small", small))]
    doc = {
        "models": models,
        "datasets": {"q": {"records": [{"id": f"q{i}", "prompt": f"question {i}"}
                                       for i in range(8)]}},
        "defaults": {"sampling": {"ignore_eos": True}},
        "nodes": [
            {"name": "answer", "model": "small", "input": {"dataset": "q"},
             "sampling": {"max_tokens": 24}},
            {"name": "check", "model": "tiny", "input": {"nodes": ["answer"]},
             "sampling": {"max_tokens": 12}},
        ],
    }  # fmt: skip
    (tmp / "app.json").write_text(json.dumps(doc))
    return tmp / "app.json"


def test_samullm_run_on_cpu_devices(
    tiny_model_dir: str, small_model_dir: str, tmp_path: Path, vllm_ready: None
) -> None:
    app = _write_app(tmp_path, tiny_model_dir, small_model_dir)
    out = tmp_path / "results.jsonl"
    argv = [sys.executable, "-m", "coordinator.cli", "run", str(app),
            "--cluster", str(ROOT / "examples/clusters/cpu2.yaml"),
            "--profiles", str(tmp_path / "profiles.json"), "--json",
            "--out", str(out), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (tmp_path / "logs").glob("*"))
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{logs}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["outputs_committed"] == 16
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lengths = {r["node"]: set() for r in rows}
    for r in rows:
        lengths[r["node"]].add(r["output_tokens"])
    assert lengths == {"answer": {24}, "check": {12}}
    queues = {g["queue"] for a in summary["plan"]["assignments"] for g in a["gpu_groups"]}
    assert queues <= {"samullm.n0.gpu0", "samullm.n0.gpu1"}
    pva = summary["planned_vs_actual"]
    assert {m["model"] for m in pva["models"]} == {"tiny", "small"}
    assert pva["job"]["actual_s"] > 0 and pva["job"]["planned_p50_s"] > 0
