"""``samullm estimate`` end to end on the shipped profiles and the shared length data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.settings import load_settings

LENGTHS = load_settings().default_lengths
needs_data = pytest.mark.skipif(not LENGTHS.exists(), reason=f"{LENGTHS} not present")


@needs_data
def test_estimate_json_over_parallelisms(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["estimate", "--model", "lmsys/vicuna-13b-v1.5", "--gpus", "4", "--requests",
                 "300", "--max-tokens", "256", "--draws", "3", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(r["tp"], r["dp"]): r for r in doc["estimates"]}
    assert set(rows) == {(1, 4), (2, 2), (4, 1)}
    for r in rows.values():
        assert 0 < r["p50_s"] <= r["p90_s"]
        assert r["profile"] == "measured" and r["mean_output_tokens"] <= 256
    # More replicas of a small model finish sooner than one wide replica.
    assert rows[(1, 4)]["p50_s"] < rows[(4, 1)]["p50_s"]


@needs_data
def test_estimate_table_and_prompt_file(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt_len\n120\n300\n45\n")
    assert main(["estimate", "--model", "lmsys/vicuna-13b-v1.5", "--tp", "2",
                 "--prompt-lens", str(prompts), "--draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 requests" in out and "fastest: tp=2 dp=1" in out


@needs_data
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nosuch/model", "--tp", "1"], "no length distribution for 'nosuch/model'"),
        (["--model", "lmsys/vicuna-13b-v1.5"], "give --tp, or --gpus"),
        (["--model", "lmsys/vicuna-13b-v1.5", "--tp", "4", "--dp", "2", "--gpus", "4"],
         "exceeds --gpus 4"),
        (["--model", "lmsys/vicuna-13b-v1.5", "--tp", "1", "--lengths", "/nonexistent.json"],
         "nonexistent.json"),
        (["--model", "meta-llama/Llama-2-70b-chat-hf", "--tp", "1"], "do not fit"),
        (["--model", "lmsys/vicuna-13b-v1.5", "--tp", "1", "--max-tokens", "0"],
         "--max-tokens must be positive"),
    ],
)
def test_estimate_errors_exit_2(extra, message, capsys) -> None:
    assert main(["estimate", *extra]) == 2
    assert message in capsys.readouterr().err


@needs_data
def test_bad_prompt_file_names_the_line(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("100\nabc\n")
    assert main(["estimate", "--model", "lmsys/vicuna-13b-v1.5", "--tp", "1",
                 "--prompt-lens", str(prompts)]) == 2
    assert "p.txt:2: prompt_len 'abc'" in capsys.readouterr().err


@needs_data
def test_automatic_tps_skip_what_does_not_fit(capsys) -> None:
    assert main(["estimate", "--model", "meta-llama/Llama-2-70b-chat-hf", "--gpus", "8",
                 "--requests", "200", "--draws", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert "skipping tp=1" in out.err
    tps = [r["tp"] for r in json.loads(out.out)["estimates"]]
    assert 1 not in tps and tps == sorted(tps) and tps


def test_unknown_model_from_its_hf_config(tmp_path: Path, capsys) -> None:
    import numpy as np

    from planning.io.lengths import save_distribution
    from planning.length_dist import LengthDistribution

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "num_hidden_layers": 26, "hidden_size": 3200, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 8640, "vocab_size": 32000,
        "torch_dtype": "float16", "max_position_embeddings": 2048,
    }))
    lengths = tmp_path / "lengths.json"
    save_distribution(lengths, LengthDistribution.from_pmf(np.full(300, 1 / 300)))
    base = ["estimate", "--model", "me/llama-3b", "--tp", "1,2", "--requests", "100",
            "--draws", "2", "--lengths", str(lengths), "--json"]
    assert main(base) == 2  # no profile and no config: a clear error naming the model
    assert "me/llama-3b" in capsys.readouterr().err
    assert main([*base, "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)["estimates"]
    assert [r["profile"] for r in rows] == ["analytic", "analytic"]
    assert all(r["p50_s"] > 0 for r in rows)
    assert main([*base[:-1], "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
