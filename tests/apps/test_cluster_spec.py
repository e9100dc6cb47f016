"""Cluster files: the shipped examples load; every bad case names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.cluster_spec import SpecError, load_cluster
from planning.cluster import Cluster, Node

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "clusters"


def test_examples_load() -> None:
    pairs = load_cluster(EXAMPLES / "a100x8_nvlink_pairs.yaml")
    assert pairs == Cluster((Node("n0", "A100-80GB", 8, ((0, 1), (2, 3), (4, 5), (6, 7))),))
    quad = load_cluster(EXAMPLES / "a100x4.yaml")
    assert quad == Cluster((Node("n0", "A100-80GB", 4, ((0, 1, 2, 3),)),))


def test_examples_say_what_they_model() -> None:
    for f in EXAMPLES.glob("*.yaml"):
        assert f.read_text(encoding="utf-8").startswith("# Models "), f.name


def test_json_file_and_island_size(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    nodes = [
        {"name": "a", "gpu": "H100-80GB", "num_gpus": 8, "island_size": 2},
        {"name": "b", "gpu": "A100-80GB", "num_gpus": 2, "nvlink_islands": [[1], [0]]},
    ]
    f.write_text(json.dumps({"nodes": nodes}))
    c = load_cluster(f)
    assert c.nodes[0].islands == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert c.nodes[1].islands == ((1,), (0,))
    assert c.num_gpus == 10


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return f


NODE = "{name: n0, gpu: A100-80GB, num_gpus: 4, island_size: 4}"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: 0, island_size: 1}\n",
         "nodes[0].num_gpus", "greater than 0"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, island_size: 1}\n",
         "nodes[0].num_gpus", "required"),
        ("nodes:\n  - {name: n0, gpu: V100, num_gpus: 4, island_size: 4}\n",
         "nodes[0].gpu", "A100-80GB, CPU, H100-80GB, H200-141GB"),
        ("nodes:\n  - " + NODE + "\n  - {name: n1, gpu: A100-80GB, num_gpus: 4,"
         " nvlink_islands: [[0, 1], [2]]}\n",
         "nodes[1].nvlink_islands", "missing [3]"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: 4,"
         " nvlink_islands: [[0, 1], [1, 2, 3]]}\n",
         "nodes[0].nvlink_islands", "repeated [1]"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: 6, island_size: 4}\n",
         "nodes[0].island_size", "does not divide"),
        ("nodes:\n  - " + NODE + "\n  - " + NODE + "\n",
         "nodes[1].name", "duplicate node name 'n0'"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: 4}\n",
         "nodes[0]", "nvlink_islands or island_size"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: 4, island_size: 4, ram: 1}\n",
         "nodes[0].ram", "Extra inputs"),
        ("nodes: []\n", "nodes", "at least 1"),
        ("nodes:\n  - {name: n0, gpu: A100-80GB, num_gpus: '4', island_size: 4}\n",
         "nodes[0].num_gpus", "integer"),
    ],
)
def test_bad_fields_name_file_and_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    f = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_cluster(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: {field}: "), msg
    assert words in msg, msg


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    with pytest.raises(SpecError, match=r"none\.yaml: file not found"):
        load_cluster(missing)
    bad = _write(tmp_path, "nodes: [\n  - {name: n0\n")
    with pytest.raises(SpecError) as info:
        load_cluster(bad)
    assert str(info.value).startswith(f"{bad}: invalid YAML at line ")
    top = _write(tmp_path, "- just a list\n")
    with pytest.raises(SpecError, match="bad.yaml: expected a mapping"):
        load_cluster(top)
    j = tmp_path / "c.json"
    j.write_text("{nodes: ")
    with pytest.raises(SpecError, match=r"c\.json: invalid JSON at line 1"):
        load_cluster(j)


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)
