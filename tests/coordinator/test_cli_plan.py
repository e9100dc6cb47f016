"""``samullm plan`` end to end: presets, JSON output, and exit code 2 on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
PAIRS = str(ROOT / "examples/clusters/a100x8_nvlink_pairs.yaml")
CHAIN = str(ROOT / "examples/paper/chain_summary_100docs.yaml")
pytestmark = pytest.mark.skipif(
    not (load_settings().shared_dir / "data" / "output_length_pdfs.json").exists(),
    reason="../shared data not present",
)


def test_plan_compare_json(capsys):
    assert main(["plan", CHAIN, "--cluster", PAIRS, "--compare", "--draws", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("makespan_p50", "makespan_p90", "lower_bound", "baselines", "stages"):
        assert key in doc
    assert set(doc["baselines"]) == {"sequential", "naive", "muxserve", "static"}
    assert doc["makespan_p90"] >= doc["makespan_p50"] >= doc["lower_bound"] > 0
    assert all(doc["makespan_p50"] <= v + 1e-6 for v in doc["baselines"].values())
    groups = [g for st in doc["stages"] for a in st["assignments"] for g in a["gpu_groups"]]
    assert groups and all(g["queue"].startswith("samullm.n0.gpu") for g in groups)
    units = {a["unit"] for st in doc["stages"] for a in st["assignments"]}
    assert "summary.0..summary.1" in units and "judge" in units


def test_plan_table(capsys):
    assert main(["plan", CHAIN, "--cluster", PAIRS, "--draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "makespan P50" in out and "judge" in out


def test_unknown_model_exits_2_naming_file_and_field(tmp_path, capsys):
    app = tmp_path / "bad.yaml"
    app.write_text(
        "models:\n  - id: lmsys/vicuna-13b-v1.5\n"
        "datasets:\n  p: {path: p.csv}\n"
        "nodes:\n  - {name: a, model: nope/x, input: {dataset: p}, sampling: {max_tokens: 8}}\n"
    )
    (tmp_path / "p.csv").write_text("id,prompt_tokens\nr0,10\n")
    assert main(["plan", str(app), "--cluster", PAIRS]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "nodes[0].model" in err


def test_missing_cluster_exits_2(tmp_path, capsys):
    assert main(["plan", CHAIN, "--cluster", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
