"""Tests for planning.io.lengths: the authors' pdfs, observation files, saved distributions."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from planning.io import files
from planning.io.lengths import (
    LengthDataError,
    load_authors_pdfs,
    load_distribution,
    load_observations,
    save_distribution,
)
from planning.length_dist import LengthDistribution

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PDFS = SHARED / "data" / "output_length_pdfs.json"
SUPERSEDED = SHARED / "data" / "output_length_pdfs_superseded.json"


# ------------------------------------------------------------------ the authors' pdfs
@pytest.fixture(scope="module")
def authors() -> dict[str, LengthDistribution]:
    if not PDFS.exists():
        pytest.skip(f"shared data not found at {PDFS}")
    return load_authors_pdfs(PDFS)


def test_authors_means_and_last_bin(authors: dict[str, LengthDistribution]) -> None:
    assert authors["vicuna-13b-v1.5"].mean() == pytest.approx(208.0, abs=0.5)
    assert authors["dolly-v2-12b"].pmf[-1] == pytest.approx(0.776, abs=5e-4)
    assert authors["dolly-v2-12b"].mean() == pytest.approx(1716.3, abs=0.5)
    assert authors["baize-v2-13b"].max_len == 2048
    assert authors["Mixtral-8x7B-Instruct-v0.1"].max_len == 32768


def test_authors_short_name_and_hf_id_both_resolve(authors: dict[str, LengthDistribution]) -> None:
    assert authors["lmsys/vicuna-13b-v1.5"] is authors["vicuna-13b-v1.5"]
    assert authors["databricks/dolly-v2-12b"] is authors["dolly-v2-12b"]
    assert len(authors) == 2 * 22  # 23 models, one degenerate (no hf_id)


def test_aquila_is_skipped_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    if not PDFS.exists():
        pytest.skip("shared data not found")
    with caplog.at_level(logging.INFO, logger="planning.io.lengths"):
        pdfs = load_authors_pdfs(PDFS)
    assert "AquilaChat-7B" not in pdfs
    assert "degenerate" in pdfs.skipped["AquilaChat-7B"]
    assert any("AquilaChat-7B" in r.getMessage() for r in caplog.records)
    with pytest.raises(KeyError, match="degenerate"):
        pdfs["AquilaChat-7B"]
    with pytest.raises(KeyError):
        pdfs["no-such-model"]


def test_superseded_file_loads() -> None:
    if not SUPERSEDED.exists():
        pytest.skip("shared data not found")
    old = load_authors_pdfs(SUPERSEDED)
    assert old["Llama-2-70b-chat-hf"].mean() == pytest.approx(442.6, abs=0.1)


def test_sampled_authors_lengths_follow_the_clip_rule(
    authors: dict[str, LengthDistribution],
) -> None:
    dist = authors["dolly-v2-12b"]
    prompt = np.arange(1, 1001)
    out = dist.sample(np.random.default_rng(0), 1000, context_left=2048 - prompt, max_tokens=900)
    assert np.all(out <= np.minimum(2048 - prompt, 900)) and np.all(out >= 1)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"pdf": [0.5, -0.1, 0.6]}, "m.pdf[1]"),
        ({"pdf": [0.5, "x"]}, "m.pdf[1]"),
        ({"pdf": []}, "m.pdf"),
        ({"pdf": [0.5, 0.5], "max_model_len": 3}, "m.max_model_len"),
        ({"pdf": [0.5, 0.2]}, "m.pdf"),
        ({"pdf": [1.0], "hf_id": 7}, "m.hf_id"),
        ("not an object", "m"),
    ],
)
def test_bad_authors_file(tmp_path: Path, entry: object, field: str) -> None:
    path = tmp_path / "pdfs.json"
    path.write_text('{\n"_note": "x",\n"m": ' + json.dumps(entry) + "\n}\n")
    with pytest.raises(LengthDataError) as info:
        load_authors_pdfs(path)
    assert info.value.field == field and info.value.line == 3
    assert str(path) in str(info.value) and f"{path}:3" in str(info.value)


def test_authors_file_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "pdfs.json"
    path.write_text('{\n"m": {"pdf": [1.0,]}\n}')
    with pytest.raises(LengthDataError, match=r"pdfs\.json:2"):
        load_authors_pdfs(path)


# ------------------------------------------------------------------ observations
CSV_OK = "prompt_len,output_len,finished,model\n10,5,true,a\n20,7,False,b\n30,9,1,a\n"
JSONL_OK = (
    '{"prompt_len": 10, "output_len": 5, "finished": true}\n\n'
    '{"prompt_len": 20, "output_len": 7, "finished": false, "extra": 1}\n'
)


def test_load_csv_with_model(tmp_path: Path) -> None:
    path = tmp_path / "obs.csv"
    path.write_text(CSV_OK)
    obs = load_observations(path)
    assert obs.prompt_len.tolist() == [10, 20, 30] and obs.output_len.tolist() == [5, 7, 9]
    assert obs.finished.tolist() == [True, False, True] and obs.model == ("a", "b", "a")
    assert obs.by_model()["a"].output_len.tolist() == [5, 9]
    dist = LengthDistribution.from_observations(obs.prompt_len, obs.output_len, obs.finished)
    assert dist.max_len == 9


def test_load_jsonl_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "obs.jsonl"
    path.write_text(JSONL_OK)
    obs = load_observations(path)
    assert obs.output_len.tolist() == [5, 7] and obs.model is None
    gz = tmp_path / "obs.csv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(CSV_OK)
    assert load_observations(gz).output_len.tolist() == [5, 7, 9]


@pytest.mark.parametrize(
    ("name", "text", "field", "line"),
    [
        ("a.csv", "prompt_len,finished\n1,true\n", "output_len", 1),
        ("a.csv", "prompt_len,output_len,finished\n1,2,true\n1,2.5,true\n", "output_len", 3),
        ("a.csv", "prompt_len,output_len,finished\n-1,2,true\n", "prompt_len", 2),
        ("a.csv", "prompt_len,output_len,finished\n1,nan,true\n", "output_len", 2),
        ("a.csv", "prompt_len,output_len,finished\n1,2,true\n3,0,true\n", "output_len", 3),
        ("a.csv", "prompt_len,output_len,finished\n1,2,maybe\n", "finished", 2),
        ("a.csv", "prompt_len,output_len,finished\n1,2\n", "finished", 2),
        ("a.jsonl", '{"prompt_len": 1, "output_len": 2}\n', "finished", 1),
        (
            "a.jsonl",
            '{"prompt_len": 1, "output_len": 2, "finished": true}\n'
            '{"prompt_len": 1, "output_len": NaN, "finished": true}\n',
            "output_len",
            2,
        ),
        ("a.jsonl", '{"prompt_len": 1.5, "output_len": 2, "finished": true}\n', "prompt_len", 1),
        ("a.jsonl", '{"prompt_len": 1, "output_len": 0, "finished": true}\n', "output_len", 1),
        (
            "a.jsonl",
            '{"prompt_len": 1, "output_len": 2, "finished": "yes", "model": "m"}\n'
            '{"prompt_len": 1, "output_len": 2, "finished": true}\n',
            "model",
            2,
        ),
        ("a.jsonl", '{"prompt_len": 1, "output_len": 2, "finished": 2}\n', "finished", 1),
    ],
)
def test_bad_observations_name_file_field_line(
    tmp_path: Path, name: str, text: str, field: str, line: int
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LengthDataError) as info:
        load_observations(path)
    err = info.value
    assert (err.field, err.line) == (field, line)
    assert f"{path}:{line}" in str(err) and repr(field) in str(err)


@pytest.mark.parametrize(
    ("name", "text", "line", "match"),
    [
        ("a.jsonl", "[1, 2]\n", 1, "JSON object"),
        ("a.jsonl", '{"prompt_len": 1,\n', 1, "invalid JSON"),
        ("a.csv", "prompt_len,output_len,finished\n", None, "no observations"),
        ("a.txt", "prompt_len,output_len,finished\n1,2,true\n", None, "unknown format"),
        ("missing.csv", None, None, "cannot open"),
    ],
)
def test_bad_observation_files(
    tmp_path: Path, name: str, text: str | None, line: int | None, match: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(LengthDataError, match=match) as info:
        load_observations(path)
    assert info.value.line == line and str(path) in str(info.value)


# ------------------------------------------------------------------ saved distributions
def test_save_load_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 2000, 5000)
    output = rng.geometric(0.01, 5000)
    finished = rng.random(5000) < 0.8
    dist = LengthDistribution.from_observations(prompt, output, finished, bucket_edges=[512])
    path = tmp_path / "dist.json"
    path.write_text("old")
    save_distribution(path, dist)
    assert load_distribution(path) == dist
    assert [p.name for p in tmp_path.iterdir()] == ["dist.json"]


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dist.json"
    save_distribution(path, LengthDistribution.from_pmf([0.5, 0.5]))
    before = path.read_text()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", boom)  # fails after the temp file is written
    with pytest.raises(OSError, match="disk full"):
        save_distribution(path, LengthDistribution.from_pmf([1.0]))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dist.json"]


def test_load_distribution_errors(tmp_path: Path) -> None:
    path = tmp_path / "dist.json"
    path.write_text('{\n"format": "samullm.lengths/1",\n"max_len": 2,\n"pmf": [0.5, 0.2]\n}\n')
    with pytest.raises(LengthDataError) as info:
        load_distribution(path)
    assert info.value.field == "pmf" and info.value.line == 4 and str(path) in str(info.value)
    path.write_text('{"format": "other"}')
    with pytest.raises(LengthDataError, match="format"):
        load_distribution(path)
