"""Planned vs actual on a real run: real Redis, two sim workers, the coordinator in a thread.

After the three-model example job, the job's state holds one planned-vs-actual row per model of
the application and the job line (coordinator/accuracy.py); ``samullm status`` and the
``samullm run`` summary (human and ``--json``) show them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator import cli, cli_run
from coordinator.accuracy import SCHEMA
from tests.runtime.conftest import APP, LENGTHS, Stack

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.skipif(not LENGTHS.is_file(), reason=f"no shared data at {LENGTHS}"),
]

FAST = 0.05  # real s per simulated s: the job takes about 2 s of wall time
JOB_TIMEOUT_S = 40.0  # s of wall time for the job to finish
EPS_S = 1e-6  # s; rounding slack between a model's end and the job's makespan
MODELS = {  # examples/runtime/three_models.yaml
    "lmsys/vicuna-13b-v1.5",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "NousResearch/Llama-2-7b-chat-hf",
}


def _run_job(stack: Stack) -> Any:
    for g in ("0", "1"):
        stack.worker(g, time_scale=FAST)
    stack.wait_workers("0", "1")
    stack.coordinator_thread()
    job = stack.submit(APP)
    try:
        job.wait(timeout=JOB_TIMEOUT_S, poll_s=0.1)
    except TimeoutError as e:
        pytest.fail(f"{e}\nstatus: {job.status()}\n{stack.logs()}")
    return job


def _check_models(doc: dict[str, Any], plan: dict[str, Any], actual: float) -> None:
    """Every model: planned span from the plan, a positive actual span within the makespan."""
    rows = {m["model"]: m for m in doc["models"]}
    assert set(rows) == MODELS
    for model, m in rows.items():
        mine = [a for a in plan["assignments"] if a["model"] == model]
        assert m["planned_start_s"] == pytest.approx(min(a["start_s"] for a in mine))
        assert m["planned_end_s"] == pytest.approx(max(a["end_s"] for a in mine))
        assert m["finished"], model
        assert 0.0 <= m["actual_start_s"] < m["actual_end_s"], model
        assert m["actual_end_s"] <= actual + EPS_S, model
        want = 100 * (m["planned_end_s"] - m["actual_end_s"]) / m["actual_end_s"]
        assert m["error_pct"] == pytest.approx(want), model
    # the job's clock starts at its first task start, and its last commit ends it
    assert min(m["actual_start_s"] for m in rows.values()) == pytest.approx(0.0, abs=EPS_S)
    assert max(m["actual_end_s"] for m in rows.values()) == pytest.approx(actual)


def test_planned_vs_actual_recorded_and_shown(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _run_job(stack)
    st, doc = job.status(), job.planned_vs_actual()
    assert doc is not None and doc == st["planned_vs_actual"]
    assert doc["schema"] == SCHEMA and doc["final"] is True
    assert doc["time_scale"] == pytest.approx(FAST)
    j, actual = doc["job"], st["actual_makespan_s"]
    assert j["actual_s"] == pytest.approx(actual) and actual > 0
    assert j["planned_p50_s"] == pytest.approx(st["planned_makespan_s"])
    assert j["planned_p90_s"] == pytest.approx(st["planned_p90_s"])
    assert j["error_pct"] == pytest.approx(100 * (j["planned_p50_s"] - actual) / actual)
    assert j["error_p90_pct"] == pytest.approx(100 * (j["planned_p90_s"] - actual) / actual)
    _check_models(doc, job.plan(), actual)

    capsys.readouterr()
    assert cli.main(["status", job.id, "--broker", stack.url]) == 0
    out = capsys.readouterr().out
    assert "planned vs actual" in out and "job (P50)" in out
    assert all(model in out for model in MODELS)
    assert f"{j['error_pct']:+.1f} %" in out

    req = SimpleNamespace(out=tmp_path / "r.jsonl", out_format=None)
    summary = cli_run._summary(job, st, req, 1.0)
    assert json.loads(json.dumps(summary))["planned_vs_actual"] == doc
    cli_run._print_summary(summary)
    out = capsys.readouterr().out
    assert "planned vs actual" in out and all(model in out for model in MODELS)
