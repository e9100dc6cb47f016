"""The measured truth: step latencies looked up in raw iteration records, recorded load times,
vLLM 0.3.0 batching on the sim engine (workers/measured_steps.py, workers/truth.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from apps.cluster_spec import SpecError
from workers.engines.base import EngineKey, EngineRequest
from workers.engines.sim_engine import SimEngine
from workers.measured_steps import MeasuredSteps, MeasuredStepsError, read_measured
from workers.truth import A100_MEASURED, Truth, TruthWorld, load_truth

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
RECORDS = DATA / "a100_vllm030_iteration_latency.csv.gz"
needs_data = pytest.mark.skipif(not RECORDS.is_file(), reason=f"no shared data at {DATA}")
VICUNA = "lmsys/vicuna-13b-v1.5"
HEADER = "model,tp,phase,batch_size,padded_tokens,sum_context_tokens,latency_s,source_block,pair_id"


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "records.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join([HEADER, *rows]) + "\n")
    return path


def _grid(model: str = "m", tp: int = 1) -> list[str]:
    """B = 1 and 2: decode points at K = B (10 ms) and K = 1000 (30 ms, twice: the faster
    kept); prefill points at P = B (15 ms) and P = 2048 (215 ms)."""
    rows = []
    for b in (1, 2):
        rows += [
            f"{model},{tp},decode,{b},{b},{b},0.010,decode_grid,0",
            f"{model},{tp},decode,{b},{b},1000,0.031,decode_grid,1",
            f"{model},{tp},decode,{b},{b},1000,0.030,decode_grid,1",
            f"{model},{tp},prefill,{b},{b},{b},0.015,prefill_grid,0",
            f"{model},{tp},prefill,{b},2048,2048,0.215,prefill_grid,1",
            f"{model},{tp},prefill,{b},{b},{b},9.0,init_profile_run,-1",  # dropped
        ]
    return rows


def test_lines_interpolate_between_the_measured_points(tmp_path: Path) -> None:
    got = read_measured(_csv(tmp_path, _grid()))
    steps = MeasuredSteps(got[("m", 1)])
    slope = (0.030 - 0.010) / (1000 - 1)  # s per KV token at B = 1 (the faster of the pair)
    assert steps.step_latency(0, 1, 1, 1, 0.0) == pytest.approx(0.010)
    assert steps.step_latency(0, 1, 1, 500, 0.0) == pytest.approx(0.010 + slope * 499)
    assert steps.step_latency(2048, 0, 1, 2048, 0.0) == pytest.approx(0.215)
    assert steps.step_latency(1024, 0, 2, 1024, 0.0) == pytest.approx(
        0.015 + (0.2 / 2046) * (1024 - 2)
    )
    # more sequences than any record: B / 2 steps of 2 sequences
    assert steps.step_latency(0, 4, 4, 8, 0.0) == pytest.approx(
        2 * steps.step_latency(0, 2, 2, 4, 0)
    )
    assert steps.context_slope(1) == pytest.approx(slope)


def test_decode_runs_have_the_closed_form_and_scale(tmp_path: Path) -> None:
    lines = read_measured(_csv(tmp_path, _grid()))[("m", 1)]
    steps, slow = MeasuredSteps(lines), MeasuredSteps(lines, scale=1.3)
    total = sum(steps.step_latency(0, 2, 2, 40 + 2 * i, 0.0) for i in range(25))
    assert steps.decode_run_latency(2, 40, 25) == pytest.approx(total)
    assert slow.decode_run_latency(2, 40, 25) == pytest.approx(1.3 * total)
    assert steps.decode_run_latency(2, 40, 0) == 0.0


def test_bad_records_name_the_line(tmp_path: Path) -> None:
    rows = _grid()
    rows[2] = "m,1,decode,1,1,1000,fast,decode_grid,1"
    with pytest.raises(MeasuredStepsError, match=r"records.csv.gz:4: bad record"):
        read_measured(_csv(tmp_path, rows))
    with pytest.raises(MeasuredStepsError, match="cannot read"):
        read_measured(tmp_path / "missing.csv.gz")


@needs_data
def test_records_give_the_readme_reference_values() -> None:
    """The shared data README's reference values (min of each pair), at the measured points."""
    world = TruthWorld(A100_MEASURED)
    tp1, tp2 = world.step_cost(VICUNA, 1), world.step_cost(VICUNA, 2)
    assert tp1.step_latency(0, 1, 1, 1, 0.0) == pytest.approx(0.0200, abs=5e-4)
    assert tp2.step_latency(0, 1, 1, 1, 0.0) == pytest.approx(0.0144, abs=5e-4)
    assert tp1.step_latency(0, 64, 64, 59407, 0.0) == pytest.approx(0.0516, abs=5e-4)
    assert tp1.step_latency(4095, 0, 1, 4095, 4095.0**2) == pytest.approx(0.451, abs=2e-3)
    # not the planner's fitted model: the two disagree somewhere on the grid
    fitted = world.profile(VICUNA, 1).step
    assert (
        abs(fitted.step_latency(0, 64, 64, 64, 0.0) / tp1.step_latency(0, 64, 64, 64, 0.0) - 1)
        > 0.05
    )


@needs_data
def test_unmeasured_model_borrows_a_proxy_scaled_by_the_profiles() -> None:
    world = TruthWorld(A100_MEASURED)
    big = world.step_cost("meta-llama/Llama-2-70b-chat-hf", 2)
    assert isinstance(big, MeasuredSteps) and big.ratio is not None
    proxy = MeasuredSteps(big.lines)
    mine, theirs = big.ratio
    args = (0, 32, 32, 20000, 0.0)
    want = proxy.step_latency(*args) * mine.step_latency(*args) / theirs.step_latency(*args)
    assert big.step_latency(*args) == pytest.approx(want)
    assert big.lines.model != "meta-llama/Llama-2-70b-chat-hf" and big.lines.tp == 2
    assert world.profile_set.archs[big.lines.model].mlp == "gated"  # like Llama-2-70b


@needs_data
def test_measured_load_time_is_a_record_picked_by_the_seed() -> None:
    records = [r.seconds for r in TruthWorld(A100_MEASURED)._load_records()[(VICUNA, 1)]]
    picks = {TruthWorld(Truth(seed=s, load="measured")).load_time(VICUNA, 1) for s in range(12)}
    assert picks <= set(records) and len(picks) > 1
    world = TruthWorld(Truth(load="measured", latency_scale={VICUNA: 2.0}))
    assert world.load_time(VICUNA, 1) / 2.0 in records
    assert TruthWorld(Truth()).load_time(VICUNA, 1) == world.profile(VICUNA, 1).load_time_s / 2.0


@needs_data
def test_sim_engine_replays_vllm_030_on_the_measured_world() -> None:
    key = EngineKey(VICUNA, 1, 256, 8192, None, 0.9, "float16")
    engine = SimEngine(key, TruthWorld(A100_MEASURED), 0.0)
    assert engine.engine_config.mode == "legacy030"
    assert engine.engine_config.max_num_batched_tokens == 4096  # max(max_model_len, 2048)
    for i in range(50):
        engine.add_request(EngineRequest(f"n/{i}", "x", 30 + 11 * i, 256))
    done = []
    while engine.has_unfinished_requests():
        done += [u for u in engine.step() if u.finished]
    assert len(done) == 50 and engine.clock_s > engine.load_s > 0


def test_truth_file_reads_the_measured_fields(tmp_path: Path) -> None:
    recs = _csv(tmp_path, _grid())
    f = tmp_path / "truth.yaml"
    f.write_text(
        f"steps: measured\niterations: {recs.name}\nload: measured\nscheduler: legacy030\n"
    )
    t = load_truth(f)
    assert (t.steps, t.load, t.scheduler, t.iterations_path) == (
        "measured",
        "measured",
        "legacy030",
        recs,
    )
    f.write_text("steps: lookup\n")
    with pytest.raises(SpecError, match="steps"):
        load_truth(f)
    f.write_text("iterations: nowhere.csv.gz\n")
    with pytest.raises(SpecError, match=r"iterations: file not found"):
        load_truth(f)
