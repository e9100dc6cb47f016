"""Tests for planning.io.profiles: round trips, bad input, atomic writes, shipped/shared data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from planning.cost_model import StepCostModel, StepRecords
from planning.io import files
from planning.io.profiles import (
    FORMAT_TAG,
    ProfileError,
    load_default_profiles,
    read_hf_config,
    read_load_times,
    read_model_sizes,
    read_profile_runs,
    read_profiles,
    read_step_records,
    read_vllm030_latency,
    write_profiles,
    write_step_records,
)
from planning.profile import (
    A100_80GB,
    AnalyticCalib,
    ModelArch,
    ModelProfile,
    ProfileSet,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
VICUNA = "lmsys/vicuna-13b-v1.5"
ARCH = ModelArch(40, 5120, 40, 40, 13824, 32000, "gated", 1, 1, 2, 4096)
CALIB = AnalyticCalib(
    step=(0.005, 0.0, 7e-5, 0.9, 1.1, 30.0, 0.25, 1.3e-5, 9.0, 0.7, 0.4, 1.4),
    knee_ridge_mult=0.5, load_base_s=5.0, load_per_extra_gpu_s=12.0, load_s_per_byte=3.4e-10,
)  # fmt: skip


def make_set() -> ProfileSet:
    step = StepCostModel(0.0123, 3.1e-5, 4.2e-5, 2.3e-5, 2.1e-7, 3.3e-10, 192.0)
    p = ModelProfile(VICUNA, 2, A100_80GB.name, step, 26.39, 13_016_279_040, 409_600, 4096,
                     "measured", 0.054)  # fmt: skip
    twin = ModelProfile("w/x", 2, A100_80GB.name, step, 30.0, 13_016_279_040, 409_600, 4096,
                        f"twin:{VICUNA}", None)  # fmt: skip
    return ProfileSet(A100_80GB, {(VICUNA, 2): p, ("w/x", 2): twin}, {VICUNA: ARCH}, CALIB)


def written(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    path = tmp_path / "profiles.json"
    write_profiles(path, make_set())
    return path, json.loads(path.read_text())


def test_profile_round_trip(tmp_path: Path) -> None:
    path, doc = written(tmp_path)
    assert doc["format"] == FORMAT_TAG
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    back = read_profiles(path)
    original = make_set()
    assert back.gpu == original.gpu and back.calib == original.calib
    assert dict(back.profiles) == dict(original.profiles)
    assert dict(back.archs) == dict(original.archs)


def test_profile_round_trip_without_calibration(tmp_path: Path) -> None:
    ps = make_set()
    path = tmp_path / "p.json"
    write_profiles(path, ProfileSet(ps.gpu, ps.profiles))
    back = read_profiles(path)
    assert back.calib is None and not back.archs


def _corrupt(tmp_path: Path, edit: str) -> Path:
    path, doc = written(tmp_path)
    entry = doc["entries"][0]  # type: ignore[index]
    if edit == "format":
        doc["format"] = "samullm.profiles/99"
    elif edit == "missing":
        del entry["load_time_s"]
    elif edit == "nan":
        entry["step"]["c_knee"] = float("nan")
    elif edit == "negative":
        entry["weight_bytes_per_gpu"] = -5
    elif edit == "gpu":
        del doc["gpu"]["peak_flops"]  # type: ignore[attr-defined]
    elif edit == "arch":
        doc["archs"][VICUNA]["mlp"] = "weird"  # type: ignore[index]
    path.write_text(json.dumps(doc))  # NaN is written as the literal NaN
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("format", "'format'"),
        ("missing", "load_time_s"),
        ("nan", "step.c_knee"),
        ("negative", "weight_bytes_per_gpu"),
        ("gpu", "peak_flops"),
        ("arch", "mlp"),
    ],
)
def test_bad_profile_file_names_file_and_field(tmp_path: Path, edit: str, field: str) -> None:
    path = _corrupt(tmp_path, edit)
    with pytest.raises(ProfileError) as info:
        read_profiles(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        read_profiles(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json.*invalid JSON"):
        read_profiles(broken)
    with pytest.raises(ProfileError, match="does not exist"):
        write_profiles(tmp_path / "no" / "dir.json", make_set())


def test_atomic_write_keeps_old_file_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = written(tmp_path)
    before = path.read_bytes()

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_profiles(path, ProfileSet(A100_80GB, {}))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_unserialisable_set_writes_nothing(tmp_path: Path) -> None:
    ps = make_set()
    bad = ProfileSet(ps.gpu, ps.profiles, ps.archs, AnalyticCalib(
        (float("inf"),) + CALIB.step[1:], 0.5, 1.0, 1.0, 1.0))  # fmt: skip
    with pytest.raises(ProfileError, match="serialise"):
        write_profiles(tmp_path / "out.json", bad)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Canonical step records.
# --------------------------------------------------------------------------------------------

HEADER = "model,tp,gpu,prefill_tokens,decode_seqs,num_seqs,context_tokens,attn_pairs,latency_s"


def test_step_records_csv_json_jsonl_agree(tmp_path: Path) -> None:
    rows = [["m", 1, "A100-80GB", 512, 0, 2, 512, 131072, 0.05],
            ["m", 1, "A100-80GB", 0, 8, 8, 4000, 0, 0.02],
            ["m", 2, "A100-80GB", 16, 4, 5, 300, 256, 0.015]]  # fmt: skip
    cols = HEADER.split(",")
    csv_path = tmp_path / "r.csv"
    csv_path.write_text(HEADER + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps([dict(zip(cols, r, strict=True)) for r in rows]))
    jsonl_path = tmp_path / "r.jsonl.gz"
    with gzip.open(jsonl_path, "wt") as handle:
        handle.write("\n".join(json.dumps(dict(zip(cols, r, strict=True))) for r in rows))
    parsed = [read_step_records(p) for p in (csv_path, json_path, jsonl_path)]
    for other in parsed[1:]:
        assert other.keys() == parsed[0].keys() == {("m", 1, "A100-80GB"), ("m", 2, "A100-80GB")}
        for key in other:
            np.testing.assert_array_equal(other[key].latency_s, parsed[0][key].latency_s)
    out = tmp_path / "again.csv"
    write_step_records(out, parsed[0])
    again = read_step_records(out)
    np.testing.assert_array_equal(again[("m", 1, "A100-80GB")].attn_pairs, [131072, 0])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("model,tp,gpu,prefill_tokens\nm,1,g,3\n", "missing column 'decode_seqs'"),
        (HEADER + "\nm,1,g,1,0,1,1,1,nan\n", ":2: column 'latency_s': not a finite"),
        (HEADER + "\nm,1,g,1,0,1,1,1,0.1\nm,1,g,1,0,1,-4,1,0.1\n",
         ":3: column 'context_tokens': negative"),
        (HEADER + "\nm,1,g,1,0,1,1,,0.1\n", ":2: missing column 'attn_pairs'"),
        (HEADER + "\nm,1.5,g,1,0,1,1,1,0.1\n", ":2: column 'tp': expected an integer"),
        (HEADER + "\nm,1,g,1,x,1,1,1,0.1\n", ":2: column 'decode_seqs': expected a number"),
    ],
)  # fmt: skip
def test_bad_step_records_name_file_line_and_column(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ProfileError) as info:
        read_step_records(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_bad_record_formats(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"r\.txt: unknown record format"):
        (tmp_path / "r.txt").write_text("x")
        read_step_records(tmp_path / "r.txt")
    (tmp_path / "r.jsonl").write_text('{"model": "m"}\n{oops\n')
    with pytest.raises(ProfileError, match=r"r\.jsonl:1: missing column 'tp'"):
        read_step_records(tmp_path / "r.jsonl")
    (tmp_path / "e.csv").write_text(HEADER + "\n")
    with pytest.raises(ProfileError, match="no records"):
        read_step_records(tmp_path / "e.csv")


def test_bad_raw_vllm030_file(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("model,tp,phase\nm,1,decode\n")
    with pytest.raises(ProfileError, match=r"raw\.csv: missing column 'batch_size'"):
        read_vllm030_latency(path)


def test_raw_vllm030_semantics(tmp_path: Path) -> None:
    cols = ("model,tp,phase,batch_size,padded_tokens,max_seq_len,sum_context_tokens,latency_s,"
            "source_block,pair_id,log_file")  # fmt: skip
    rows = [
        "m,1,prefill,512,4096,8,4096,0.5,init_profile_run,-1,f",
        "m,1,prefill,4,400,100,390,0.09,prefill_grid,7,f",
        "m,1,prefill,4,396,99,389,0.08,prefill_grid,7,f",
        "m,1,decode,3,3,50,120,0.03,decode_grid,7,f",
        "m,1,decode,3,3,50,121,0.031,decode_grid,7,f",
    ]
    path = tmp_path / "raw.csv"
    path.write_text(cols + "\n" + "\n".join(rows) + "\n")
    legacy = read_vllm030_latency(path)[("m", 1)]
    r = legacy.records
    assert len(r) == 2  # warm-up dropped; one row per pair
    np.testing.assert_array_equal(r.prefill_tokens, [0, 396])
    np.testing.assert_array_equal(r.attn_pairs, [0, 4 * 99 * 99])
    np.testing.assert_array_equal(r.context_tokens, [120, 396])
    np.testing.assert_array_equal(r.decode_seqs, [3, 0])
    np.testing.assert_array_equal(legacy.is_prefill, [False, True])
    every = read_vllm030_latency(path, min_of_pairs=False)[("m", 1)]
    assert len(every.records) == 4 and len(set(every.pair_group.tolist())) == 2


def test_model_sizes_missing_max_len(tmp_path: Path) -> None:
    cfg = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 4,
           "intermediate_size": 128, "vocab_size": 100, "mlp": "plain"}  # fmt: skip
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"a/b": {"config": cfg, "per_tp": {}}}))
    with pytest.raises(
        ProfileError, match=r"sizes\.json: a/b.config: missing field 'max_model_len'"
    ):
        read_model_sizes(path)
    assert read_model_sizes(path, default_max_model_len=2048)["a/b"].arch.max_model_len == 2048


# --------------------------------------------------------------------------------------------
# Shipped profile file and the shared data.
# --------------------------------------------------------------------------------------------


def test_default_profiles_ship_vicuna() -> None:
    ps = load_default_profiles()
    assert ps.gpu == A100_80GB and ps.calib is not None
    for tp in (1, 2, 4):
        p = ps.get(VICUNA, tp)
        assert p.source == "measured" and p.fit_mape is not None and p.fit_mape < 0.1
        assert p.kv_capacity_blocks(ps.gpu.memory_bytes) > 0
    assert ps.get("WizardLMTeam/WizardLM-13B-V1.2", 2).source.startswith("twin:")
    assert ps.get("meta-llama/Llama-2-70b-chat-hf", 8).source == "analytic"


@pytest.fixture(scope="module")
def shared() -> Path:
    if not (SHARED_DATA / "a100_vllm030_iteration_latency.csv.gz").is_file():
        pytest.skip("shared data folder not present")
    return SHARED_DATA


def test_shared_latency_reference_values(shared: Path) -> None:
    data = read_vllm030_latency(shared / "a100_vllm030_iteration_latency.csv.gz")
    assert len(data) == 47
    v1 = data[(VICUNA, 1)]
    assert len(v1.records) == 2560 and int(v1.is_prefill.sum()) == 1024
    r = v1.records
    one = (r.decode_seqs == 1) & (r.context_tokens <= 2)  # decode B=1, ~1 token per sequence
    assert r.latency_s[one].min() == pytest.approx(0.0200, abs=5e-4)
    long = (r.prefill_tokens == 4095) & (r.num_seqs == 1)
    assert r.latency_s[long].min() == pytest.approx(0.451, abs=2e-3)


def test_shared_load_times_and_sizes(shared: Path) -> None:
    loads = read_load_times(shared / "a100_model_load_time.json")
    assert loads[(VICUNA, 1)].seconds == pytest.approx(14.04, abs=0.01)
    assert loads[(VICUNA, 1)].machine == "unlabelled"
    assert loads[("WizardLMTeam/WizardLM-13B-V1.2", 1)].machine == "zxcpu5"
    sizes = read_model_sizes(shared / "model_sizes.json", default_max_model_len=4096)
    assert sizes[VICUNA].arch == ARCH
    assert sizes[VICUNA].weight_bytes_per_gpu[2] == 13_016_279_040
    assert 1 not in sizes["NousResearch/Llama-2-70b-hf"].weight_bytes_per_gpu


def test_cli_fit_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from coordinator import cli_profile

    parser = argparse.ArgumentParser()
    cli_profile.register(parser.add_subparsers(dest="command"))
    rng = np.random.default_rng(0)
    b = rng.integers(1, 64, 40).astype(float)
    step = StepCostModel(0.02, 5e-5, 5e-5, 3e-5, 4e-7, 2e-10, 128.0)
    feats = [b * 8, np.zeros(40), b, b * 8, b * 64, np.zeros(40)]
    lat = [step.step_latency(*(float(f[i]) for f in feats[:5])) for i in range(40)]
    rec = StepRecords(*feats[:5], np.array(lat))
    good = tmp_path / "good.csv"
    write_step_records(good, {(VICUNA, 1, "A100-80GB"): rec})
    out = tmp_path / "out.json"
    args = parser.parse_args(["fit-profile", str(good), "--out", str(out)])
    assert args.func(args) == 0
    assert read_profiles(out).get(VICUNA, 1).weight_bytes_per_gpu == 26_031_728_640
    assert VICUNA in capsys.readouterr().out
    unknown = tmp_path / "unknown.csv"
    write_step_records(unknown, {("nobody/model", 1, "A100-80GB"): rec})
    args = parser.parse_args(["fit-profile", str(unknown), "--out", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "nobody/model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Activation bytes in profile files, profile runs, Hugging Face configs.
# --------------------------------------------------------------------------------------------


def test_profile_file_keeps_activation_and_reads_old_files(tmp_path: Path) -> None:
    ps = make_set()
    p = ps.profiles[(VICUNA, 2)]
    calib = AnalyticCalib(CALIB.step, 0.5, 5.0, 12.0, 3.4e-10, (6e8, 5e8, 3e8, 3.0, 8.0))
    with_act = ModelProfile(p.model, p.tp, p.gpu, p.step, p.load_time_s, p.weight_bytes_per_gpu,
                            p.kv_bytes_per_token_per_gpu, p.max_model_len, p.source, p.fit_mape,
                            1_922_455_552)  # fmt: skip
    path = tmp_path / "p.json"
    write_profiles(path, ProfileSet(ps.gpu, {(VICUNA, 2): with_act}, ps.archs, calib))
    back = read_profiles(path)
    assert back.get(VICUNA, 2) == with_act and back.calib == calib
    doc = json.loads(path.read_text())
    del doc["entries"][0]["activation_bytes_per_gpu"]
    del doc["calibration"]["activation"]
    path.write_text(json.dumps(doc))  # a file written before the field existed
    old = read_profiles(path)
    assert old.get(VICUNA, 2).activation_bytes_per_gpu == 0
    assert old.calib is not None and old.calib.activation == (0.0,) * 5
    doc["entries"][0]["activation_bytes_per_gpu"] = -1
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"p\.json: entries\[0\]\.activation_bytes_per_gpu"):
        read_profiles(path)


def test_read_profile_runs_errors(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    path.write_text("model,tp,num_gpu_blocks\nm,1,5\n")
    with pytest.raises(ProfileError, match="runs.csv: missing column 'kv_cache_bytes_per_block'"):
        read_profile_runs(path)
    cols = ("model,tp,num_gpu_blocks,kv_cache_bytes_per_block,block_size_tokens,"
            "total_gpu_memory_bytes,profiled_peak_memory_bytes,gpu_memory_utilization")  # fmt: skip
    path.write_text(f"{cols}\nm,1,5,100,16,1000,500,0.9\nm,2,x,100,16,1000,500,0.9\n")
    with pytest.raises(ProfileError, match=r"runs.csv:3: column 'num_gpu_blocks'"):
        read_profile_runs(path)


VICUNA_HF = {
    "_name_or_path": "vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 13824, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 40, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000,
}  # fmt: skip
NEOX_HF = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 6144, "initializer_range": 0.02,
    "intermediate_size": 24576, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 64, "num_hidden_layers": 44,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True,
    "vocab_size": 50432,
}  # fmt: skip
NEOX_ARCH = ModelArch(44, 6144, 64, 64, 24576, 50432, "plain", 1, 1, 2, 2048)


def _hf(tmp_path: Path, cfg: dict[str, object], name: str = "config.json") -> Path:
    folder = tmp_path / name.removesuffix(".json")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_read_hf_config_llama_and_neox(tmp_path: Path) -> None:
    vicuna = _hf(tmp_path, VICUNA_HF, "vicuna")
    assert read_hf_config(vicuna) == ARCH  # a folder holding config.json
    assert read_hf_config(vicuna / "config.json") == ARCH
    assert read_hf_config(vicuna, max_model_len=2048).max_model_len == 2048
    assert read_hf_config(_hf(tmp_path, NEOX_HF, "neox")) == NEOX_ARCH
    gptj = {"model_type": "gptj", "n_layer": 28, "n_embd": 4096, "n_head": 16,
            "n_inner": None, "n_positions": 2048, "vocab_size": 50400,
            "activation_function": "gelu_new"}  # fmt: skip
    assert read_hf_config(_hf(tmp_path, gptj, "gptj")) == ModelArch(
        28, 4096, 16, 16, 16384, 50400, "plain", 1, 1, 2, 2048)  # fmt: skip
    glm = {"model_type": "chatglm", "num_layers": 28, "hidden_size": 4096,
           "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
           "ffn_hidden_size": 13696, "padded_vocab_size": 65024, "seq_length": 8192,
           "torch_dtype": "float16"}  # fmt: skip
    assert read_hf_config(_hf(tmp_path, glm, "glm")) == ModelArch(
        28, 4096, 32, 2, 13696, 65024, "gated", 1, 1, 2, 8192)  # fmt: skip
    mixtral = {**VICUNA_HF, "model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096,
               "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
               "num_local_experts": 8, "num_experts_per_tok": 2, "torch_dtype": "bfloat16",
               "max_position_embeddings": 32768}  # fmt: skip
    moe = read_hf_config(_hf(tmp_path, mixtral, "mixtral"))
    assert (moe.mlp, moe.num_experts, moe.experts_per_tok, moe.kv_heads) == ("moe", 8, 2, 8)
    other = {**NEOX_HF, "model_type": "newfamily", "hidden_act": "silu"}
    assert read_hf_config(_hf(tmp_path, other, "other")).mlp == "gated"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"num_hidden_layers": None}, "missing key 'num_hidden_layers' / 'n_layer'"),
        ({"max_position_embeddings": None}, "missing key 'max_position_embeddings'"),
        ({"torch_dtype": "int8"}, "field 'torch_dtype'"),
        ({"hidden_size": -5}, "field 'hidden_size'"),
        ({"num_attention_heads": 7}, "hidden % heads"),
        ({"num_local_experts": 8}, "missing key 'num_experts_per_tok'"),
    ],
)
def test_read_hf_config_errors_name_file_and_key(
    tmp_path: Path, edit: dict[str, object], match: str
) -> None:
    folder = _hf(tmp_path, {**VICUNA_HF, **edit})
    with pytest.raises(ProfileError, match=match) as info:
        read_hf_config(folder)
    assert str(folder / "config.json") in str(info.value)


def test_hf_config_resolves_analytic_profile(tmp_path: Path) -> None:
    arch = read_hf_config(_hf(tmp_path, VICUNA_HF))
    ps = load_default_profiles()
    p = ps.resolve("my/vicuna-finetune", 2, arch=arch)
    assert p.source == "analytic" and p.activation_bytes_per_gpu > 0
    assert p.kv_capacity_blocks(ps.gpu.memory_bytes) < p.kv_capacity_blocks(
        ps.gpu.memory_bytes, activation_bytes=0
    )
    with pytest.raises(ValueError, match="my/vicuna-finetune: tp=3 .* 40 attention heads"):
        ps.resolve("my/vicuna-finetune", 3, arch=arch)
    with pytest.raises(ValueError, match="tp=3"):
        ps.get(VICUNA, 3)


def test_shared_hf_configs_match_model_sizes(tmp_path: Path, shared: Path) -> None:
    sizes = read_model_sizes(shared / "model_sizes.json", default_max_model_len=4096)
    assert read_hf_config(_hf(tmp_path, VICUNA_HF, "v")) == sizes[VICUNA].arch
    assert read_hf_config(_hf(tmp_path, NEOX_HF, "n")) == sizes["EleutherAI/gpt-neox-20b"].arch


def test_shipped_kv_blocks_reproduce_vllm_logs(shared: Path) -> None:
    """With its activation bytes, every measured profile gives vLLM's logged block count."""
    runs = read_profile_runs(shared / "a100_vllm030_profile_runs.csv")
    ps = load_default_profiles()
    assert len(runs) == 47
    for (model, tp), run in runs.items():
        p = ps.get(model, tp)
        assert p.source == "measured" and p.activation_bytes_per_gpu > 0
        got = p.kv_capacity_blocks(run.total_gpu_memory_bytes, run.gpu_memory_utilization)
        assert got == run.num_gpu_blocks, (model, tp)
    assert ps.get(VICUNA, 1).kv_capacity_blocks(ps.gpu.memory_bytes) == 3727
    assert ps.get("mistralai/Mixtral-8x7B-v0.1", 2).kv_capacity_blocks(ps.gpu.memory_bytes) == 23019
