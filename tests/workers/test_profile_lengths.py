"""``samullm profile`` and ``samullm lengths``: a measured CPU profile and a length distribution
that the application loader and the planner accept.

The ``vllm_cpu`` tests share one module fixture: ``profile`` of the tiny model (pinned to core 0),
``profile`` of the small model into the same file (core 1) and ``lengths`` run side by side (about
30-45 s on 2 cores). Bad input needs no vLLM: the commands stop before loading it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from apps.app_spec import load_app
from apps.cluster_spec import parse_cluster
from planning.estimate import serving_for
from planning.io.lengths import load_distribution, load_observations
from planning.io.profiles import (
    load_default_profiles,
    read_profiles,
    read_step_records,
    write_profiles,
)
from planning.planner import PlannerConfig, plan_app
from workers.engines.vllm_engine import StepRecord
from workers.lengths_cmd import read_prompts, sample_prompts
from workers.profile_cmd import Batch, CliError, blocks_needed, fastest, fit_capacity, grid

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 48  # tokens per generated request in the lengths run
N_PROMPTS = 24  # prompts the lengths run samples
WORDS = ("a", "stage", "ends", "when", "its", "first", "model", "finishes", "the", "worker",
         "reports", "token", "progress")  # fmt: skip


def _env() -> dict[str, str]:
    """The CPU vLLM environment (cpu-vllm.md), with the repository importable."""
    return {
        **os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }  # fmt: skip


def _cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *(str(a) for a in args)]


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(*args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _write_prompts(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS, int(rng.integers(3, 40))))}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- no vLLM needed


def _not_a_causal_lm(tmp_path: Path) -> Path:
    folder = tmp_path / "encoder"
    folder.mkdir()
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("command", ["profile", "lengths"])
@pytest.mark.parametrize("case", ["missing", "no-config", "not-causal"])
def test_bad_model_path_exits_2_naming_it(tmp_path: Path, command: str, case: str) -> None:
    if case == "missing":
        model, why = tmp_path / "nope", "no such folder"
    elif case == "no-config":
        model, why = tmp_path / "empty", "no config.json"
        model.mkdir()
    else:
        model, why = _not_a_causal_lm(tmp_path), "not a causal language model"
    extra: list[str | Path] = []
    if command == "lengths":
        extra = ["--prompts", _write_prompts(tmp_path / "p.jsonl", 3)]
    res = _run(command, "--model", model, "--out", tmp_path / "out.json", *extra, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(model) in lines[0] and why in lines[0], res.stderr
    assert not (tmp_path / "out.json").exists()


def test_profile_refuses_a_profile_file_of_another_device(tmp_path: Path) -> None:
    a100 = tmp_path / "a100.json"
    write_profiles(a100, load_default_profiles())
    model = tmp_path / "m"
    model.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 512, "vocab_size": 321}  # fmt: skip
    cfg["max_position_embeddings"] = 2048
    (model / "config.json").write_text(json.dumps(cfg))
    res = _run("profile", "--model", model, "--out", a100, timeout=60)
    assert res.returncode == 2
    assert "A100-80GB" in res.stderr and "CPU" in res.stderr and str(a100) in res.stderr


def test_help_comes_from_the_worker_modules() -> None:
    for command, option in (("profile", "--grid"), ("lengths", "--chat-template")):
        res = _run(command, "--help", timeout=60)
        assert res.returncode == 0 and f"samullm {command}" in res.stdout and option in res.stdout


def test_quick_grid_has_prefill_decode_and_crowded_batches() -> None:
    batches = grid("quick", 512, 256)
    assert all(b.prompt_len + b.output_len <= 512 for b in batches)
    assert any(b.output_len == 1 and b.num_seqs > 1 for b in batches)  # pure prefill
    assert any(b.output_len >= 32 for b in batches)  # decodes
    assert any(b.num_seqs > 256 for b in batches)  # waiting requests join running decodes
    assert any(b.prompt_len + b.output_len == 512 for b in batches)  # contexts to the limit
    assert blocks_needed([Batch(4, 100, 100)], 128) == 4 * 2 + 1
    assert fit_capacity([Batch(8, 100, 28)], capacity=512) == [Batch(4, 100, 28)]
    assert len(grid("full", 4096, 256)) > len(batches)


def test_fastest_keeps_each_steps_minimum() -> None:
    def run(*lat: float) -> list[StepRecord]:
        return [StepRecord(10 * i, 1, 2, 20, 0.0, 0, t) for i, t in enumerate(lat)]

    assert [s.latency_s for s in fastest([run(3, 1), run(2, 4)])] == [2, 1]
    other = [StepRecord(99, 0, 1, 99, 0.0, 0, 5.0)]
    assert len(fastest([run(3, 1), other])) == 3  # schedules differ: keep everything


def test_prompt_files_errors_name_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "p.csv"
    good.write_text('id,prompt\n1,hello there\n2,"two, words"\n')
    assert read_prompts(good) == ["hello there", "two, words"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": 3}\n')
    with pytest.raises(CliError, match=rf"{bad}:3: column 'prompt'"):
        read_prompts(bad)
    tokens_only = tmp_path / "t.csv"
    tokens_only.write_text("id,prompt_tokens\n1,10\n")
    with pytest.raises(CliError, match=rf"{tokens_only}:2: column 'prompt': expected non-empty"):
        read_prompts(tokens_only)
    assert sample_prompts(list("abcdef"), 3, 0) == sample_prompts(list("abcdef"), 3, 0)
    assert len(sample_prompts(list("abcdef"), 3, 0)) == 3


# ----------------------------------------------------------------------------- real vLLM (CPU)


@dataclass(frozen=True)
class Measured:
    """Outputs of the three real runs."""

    models: dict[str, str]  # name -> model folder
    profiles: Path
    prompts: Path
    observations: Path
    lengths: Path
    stdout: dict[str, str]  # "profile-tiny" | "profile-small" | "lengths" -> stdout


@dataclass
class _Proc:
    """A command started in the background; its output goes to files (no pipe to fill up)."""

    what: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def finish(self, timeout: float = 180) -> str:
        """Wait; the stdout text (the test fails with the stderr tail on a non-zero exit)."""
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"{self.what} failed ({code}):\n{self.err.read_text()[-4000:]}"
        return self.out.read_text()


def _start(what: str, folder: Path, args: Sequence[str | Path]) -> _Proc:
    out, err = folder / f"{what}.out", folder / f"{what}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=o, stderr=e)
    return _Proc(what, proc, out, err)


@pytest.fixture(scope="module")
def measured(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str, small_model_dir: str,
    vllm_ready: None,
) -> Iterator[Measured]:  # fmt: skip
    d = tmp_path_factory.mktemp("measured")
    out, prompts = d / "cpu_profiles.json", _write_prompts(d / "prompts.jsonl", 40)
    obs, dist = d / "tiny.observations.csv", d / "tiny.lengths.json"
    small: list[str | Path] = ["profile", "--model", small_model_dir, "--name", "small"]
    small += ["--out", out]
    two_cores = len(os.sched_getaffinity(0)) >= 2
    procs = [
        _start("lengths", d, ["lengths", "--model", tiny_model_dir, "--name", "tiny",
                              "--prompts", prompts, "--sample", str(N_PROMPTS),
                              "--max-tokens", str(MAX_TOKENS), "--max-model-len", "512",
                              "--observations", obs, "--out", dist]),
        _start("profile-tiny", d, ["profile", "--model", tiny_model_dir, "--name", "tiny",
                                   "--out", out]),
    ]  # fmt: skip
    try:
        # NOTE(test): with two cores the small model is measured on the other one meanwhile;
        # each run reads the profile file again right before writing it, so the later merges.
        if two_cores:
            procs.append(_start("profile-small", d, [*small, "--devices", "1"]))
        stdout = {p.what: p.finish() for p in procs}
        if not two_cores:
            stdout["profile-small"] = _start("profile-small", d, small).finish()
        models = {"tiny": tiny_model_dir, "small": small_model_dir}
        yield Measured(models, out, prompts, obs, dist, stdout)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


@pytest.mark.vllm_cpu
def test_profile_file_holds_both_measured_models(measured: Measured) -> None:
    ps = read_profiles(measured.profiles)
    assert ps.gpu.name == "CPU" and set(ps.profiles) == {("tiny", 1), ("small", 1)}
    for name in ("tiny", "small"):
        p = ps.profiles[(name, 1)]
        assert p.source == "measured" and p.gpu == "CPU" and p.max_model_len == 512
        assert 0 < p.load_time_s < 60
        assert p.fit_mape is not None and 0 <= p.fit_mape < 1
        assert p.step.step_latency(0, 8, 8, 800, 0.0) > 0
        assert name in ps.archs
        records = measured.profiles.with_name(f"cpu_profiles.{name}.tp1.records.csv")
        (key, rec), = read_step_records(records).items()
        assert key == (name, 1, "CPU") and len(rec) > 100
        prefill = rec.decode_seqs == 0
        mixed = (rec.prefill_tokens > 0) & (rec.decode_seqs > 0)
        assert prefill.sum() >= 5 and (~prefill).sum() >= 100 and mixed.sum() >= 1
        line = next(x for x in measured.stdout[f"profile-{name}"].splitlines()
                    if x.startswith(name))  # fmt: skip
        assert line.split()[:3] == [name, "1", "CPU"]
    assert "wrote profile to" in measured.stdout["profile-small"]
    # the second model's merge kept the first one untouched
    small_first = ps.profiles[("small", 1)]
    assert ps.profiles[("tiny", 1)].weight_bytes_per_gpu < small_first.weight_bytes_per_gpu


@pytest.mark.vllm_cpu
def test_lengths_writes_observations_and_a_distribution(measured: Measured) -> None:
    obs = load_observations(measured.observations)
    assert obs.output_len.size == N_PROMPTS and obs.model == ("tiny",) * N_PROMPTS
    assert (obs.prompt_len > 0).all() and (obs.output_len <= MAX_TOKENS).all()
    assert (obs.output_len[~obs.finished] == MAX_TOKENS).all()  # censored at max tokens
    dist = load_distribution(measured.lengths)
    assert dist.max_len == MAX_TOKENS and 1 <= dist.mean() <= MAX_TOKENS
    assert "finished by EOS" in measured.stdout["lengths"]


@pytest.mark.vllm_cpu
def test_planner_accepts_the_measured_profiles_and_lengths(
    measured: Measured, tmp_path: Path
) -> None:
    models = [{"id": name, "path": folder, "profile": "measured", "lengths": str(measured.lengths),
               "max_model_len": 512} for name, folder in measured.models.items()]  # fmt: skip
    app = {
        "models": models,
        "datasets": {"prompts": {"path": str(measured.prompts)}},
        "nodes": [
            {"name": "draft", "model": "tiny", "input": {"dataset": "prompts"}},
            {"name": "judge", "model": "small", "input": {"nodes": ["draft"]}},
        ],
        "defaults": {"sampling": {"max_tokens": MAX_TOKENS}},
    }
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(app))
    cluster = parse_cluster(
        {"nodes": [{"name": "n0", "gpu": "CPU", "num_gpus": 2, "island_size": 1}]}, "cpu2"
    )
    serving = serving_for("CPU")
    loaded = load_app(path, cluster=cluster, profiles=read_profiles(measured.profiles),
                      authors_pdfs={}, serving=serving)  # fmt: skip
    assert {p.source for p in loaded.profiles.profiles.values()} == {"measured"}
    report = plan_app(loaded.graph, cluster, serving=serving, config=PlannerConfig(draws=2))
    est = report.best
    assert est.plan.assignments and est.p90 >= est.p50 > 0
    assert {loaded.graph.models[m].profiles[1].source for m in ("tiny", "small")} == {"measured"}
