"""Online latency recalibration on the real runtime: sim workers whose truth runs one model's
steps 1.5x slower than the planner believes; the coordinator measures it from progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.calibration import LatencyCalibration, window_ratio
from planning.cost_model import StepCostModel
from tests.runtime.conftest import LENGTHS, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not LENGTHS.is_file(), reason=f"no shared data at {LENGTHS}"),
]

SLOWER = "lmsys/vicuna-13b-v1.5"
TRUE_SCALE = 1.5  # truth: this model's steps take 1.5x the believed time
LONGER = "mistralai/Mistral-7B-Instruct-v0.2"
TRUE_STRETCH = 2.0  # truth: this model's outputs are twice as long as believed
SLOW = 0.25  # real s per simulated s: stages last seconds, enough progress windows


def test_window_ratio_and_calibration_math() -> None:
    step = StepCostModel(0.01, 1e-4, 0.0, 1e-4, 1e-6, 0.0, 4096.0)
    running = {"a": 1000, "b": 2000}
    want = step.step_latency(0, 2, 2, 3000 - 2 * 8, 0.0)  # contexts mid-window (16 steps)
    assert window_ratio(step, 2 * want, 16, running, {}) == pytest.approx(2.0)
    assert window_ratio(step, want, 2, running, {}) is None  # too few steps
    cal = LatencyCalibration()
    for r in (1.4, 1.6, 1.5):
        assert cal.scale == 1.0  # not before MIN_WINDOWS
        cal.add(r)
    cal.add(float("nan"))
    cal.add(500.0)  # a glitch: ignored
    assert cal.n == 3 and cal.scale == pytest.approx((1.4 * 1.6 * 1.5) ** (1 / 3))
    assert 0 < cal.stderr < 0.1


def test_slower_model_is_measured_from_progress(stack: Stack, tmp_path: Path) -> None:
    truth = tmp_path / "truth.yaml"
    truth.write_text(json.dumps({"models": {SLOWER: {"latency_scale": TRUE_SCALE},
                                            LONGER: {"length_scale": TRUE_STRETCH}}}))
    for g in ("0", "1"):
        stack.worker(g, time_scale=SLOW, truth=truth)
    stack.wait_workers("0", "1")
    stack.coordinator_thread()
    job = stack.submit()
    st = job.wait(timeout=60, poll_s=0.1)
    cal = st["calibration"]
    print(cal)
    assert cal[SLOWER]["windows"] >= 3
    assert cal[SLOWER]["latency_scale"] == pytest.approx(TRUE_SCALE, rel=0.12)
    # the right-belief models: measured too, and never given a wrong scale (a scale leaves 1
    # only once at least 3 windows agree; how many windows they get depends on the host)
    others = [c for m, c in cal.items() if m != SLOWER]
    assert max(c["windows"] for c in others) >= 2
    assert all(c["latency_scale"] == pytest.approx(1.0, rel=0.12) for c in others)
    # lengths: 40 answers each, some cut at max_tokens (lower bounds, not exact lengths)
    assert cal[LONGER]["length_scale"] == pytest.approx(TRUE_STRETCH, rel=0.2)
    assert cal[SLOWER]["length_scale"] == pytest.approx(1.0, rel=0.2)
    assert cal[LONGER]["length_exact"] + cal[LONGER]["length_bounds"] == 40
