"""``samullm run`` on a CPU cluster drives real vLLM workers end to end (CPU build).

The user's command, as a subprocess: a private Redis, the coordinator and one ``--engine vllm``
worker per CPU device start, a two-model application (two random Llamas of different sizes,
with routes, a fuser and a chain summary) is planned from a profile file and runs; every output
is committed once with the exact length asked for (``ignore_eos``) on the model its route
chose, and the summary holds the planned-vs-actual record.
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


DOC = " ".join(f"Part {k}: the river carried old stories past the mill." for k in range(12))


def _write_app(tmp: Path, tiny: str, small: str) -> Path:
    """Every application kind at once: a route by label column, a route by a router LLM (a
    random model names no label, so the default takes it), a fuser of both answers, and a
    chain summary of documents chunked with the model's own tokenizer."""
    ps = ProfileSet(CPU_DEVICE, {("tiny", 1): _profile("tiny", tiny),
                                 ("small", 1): _profile("small", small)})  # fmt: skip
    (tmp / "profiles.json").write_text(profiles_to_json(ps))
    save_distribution(tmp / "len.json", LengthDistribution.from_pmf(np.full(32, 1 / 32)))
    models = [{"id": n, "path": p, "profile": "measured", "lengths": "len.json",
               "max_model_len": 512} for n, p in (("tiny", tiny), ("small", small))]
    rows = [{"id": f"q{i}", "prompt": f"question {i}", "size": "small" if i % 2 else "tiny"}
            for i in range(8)]  # fmt: skip
    docs = [{"id": f"d{i}", "prompt": DOC[: 120 + 200 * i]} for i in range(3)]
    doc = {
        "models": models,
        "datasets": {"q": {"records": rows}, "docs": {"records": docs}, "batch": {"records": [
            json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "tiny", "max_tokens": 5, "messages": [
                            {"role": "system", "content": "Be brief."},
                            {"role": "user", "content": f"Name a colour ({i})."}]}})
            for i in range(2)] + ["{not json"]}},
        "defaults": {"sampling": {"ignore_eos": True, "max_tokens": 12}},
        "nodes": [
            {"name": "answer", "route": {"dataset": "q", "column": "size",
                                         "targets": {"small": "small", "tiny": "tiny"},
                                         "template": "Q: {prompt}\nA:"},
             "sampling": {"max_tokens": 24}},
            {"name": "pick", "model": "tiny", "input": {"dataset": "q"}},
            {"name": "alt", "route": {"dataset": "q", "router": "pick", "default": "tiny",
                                      "targets": {"small": "small", "tiny": "tiny"}}},
            {"name": "check", "model": "tiny",
             "input": {"dataset": "q", "nodes": ["answer", "alt"],
                       "template": "Question: {prompt}\nCandidates:\n{inputs}\nBest:"}},
            {"name": "chat", "model": "tiny", "input": {"dataset": "batch"}},
            {"name": "summary", "model": "small", "chain": {
                "dataset": "docs", "chunk_tokens": 48, "first_template": "Summarise: {chunk}",
                "template": "So far: {summary}\nNext: {chunk}\nSummary:"}},
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
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_node: dict[str, set[str]] = {}
    for r in rows:
        want = 24 if r["node"].startswith("answer.") else 5 if r["node"] == "chat" else 12
        assert r["output_tokens"] == want, r
        by_node.setdefault(r["node"], set()).add(r["request_id"])
        assert r["model"] == ("small" if r["node"] in ("answer.small", "alt.small") or
                              r["node"].startswith("summary.") else "tiny"), r  # fmt: skip
    qs = {f"q{i}" for i in range(8)}
    assert by_node["answer.small"] == {f"q{i}" for i in range(1, 8, 2)}  # by the size column
    assert by_node["answer.tiny"] == qs - by_node["answer.small"]
    alt = by_node.get("alt.small", set()) | by_node.get("alt.tiny", set())
    assert alt == qs and not by_node.get("alt.small", set()) & by_node.get("alt.tiny", set())
    assert by_node["check"] == by_node["pick"] == qs
    chunks = sorted(n for n in by_node if n.startswith("summary."))
    assert len(chunks) >= 3 and by_node["summary.0"] == {"d0", "d1", "d2"}  # 3 docs, 1+ chunks
    assert by_node["chat"] == {"b0", "b1"}  # chat messages, the row's own max_tokens
    assert summary["rejected"] == 1  # the line that is not JSON, and nothing else
    assert summary["status"] == "done" and summary["requests_failed"] == 0
    assert summary["outputs_committed"] == len(rows)
    queues = {g["queue"] for a in summary["plan"]["assignments"] for g in a["gpu_groups"]}
    assert queues <= {"samullm.n0.gpu0", "samullm.n0.gpu1"}
    pva = summary["planned_vs_actual"]
    assert {m["model"] for m in pva["models"]} == {"tiny", "small"}
    assert pva["job"]["actual_s"] > 0 and pva["job"]["planned_p50_s"] > 0
