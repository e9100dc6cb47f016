"""Run-time adjustment on the real runtime (private Redis, coordinator, Celery sim workers):
a wrong belief makes the job switch plans, a lost worker's work is re-planned, preempted
requests are neither lost nor duplicated, and a restarted coordinator rebuilds the switched
plan from Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.replanning import DOLLY, VICUNA, Scenario, kill_later, write_inputs
from coordinator.client import Client
from coordinator.gantt import draw, job_spans
from coordinator.job import build_job, plan_doc
from coordinator.local import RunRequest, follow, local_stack, start_workers
from coordinator.messages import JobOptions, JobSubmission
from coordinator.runner import DEAD_AFTER_S, JobRun
from coordinator.store import JobKeys, decode
from tests.runtime.conftest import LENGTHS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not LENGTHS.is_file(), reason=f"no shared data at {LENGTHS}"),
]

PROMPTS = 1000  # per model (smaller jobs leave too little to gain: see docs/replanning.md)
TIME_SCALE = 0.04  # real s per simulated s
KILLED: list[dict[str, float]] = []  # per kill: ``at`` (unix s), set by the kill thread
WRONG = Scenario("lengths", {VICUNA: {"length_scale": 2.0}, DOLLY: {"length_scale": 0.5}})


def _run(tmp: Path, sc: Scenario, check: Any) -> dict[str, Any]:
    """Run the bench's ensemble under ``sc`` with adjustment on; ``check(job, r)`` runs while
    the private Redis is still up. The final status."""
    write_inputs(tmp, PROMPTS)
    truth = tmp / "truth.json"
    truth.write_text(json.dumps({"models": sc.truth}))
    req = RunRequest(app=tmp / "app.yaml", cluster=tmp / "cluster.yaml", options=JobOptions(),
                     time_scale=TIME_SCALE, out=None, broker=None, live=False,
                     log_dir=tmp / "logs", truth=truth)  # fmt: skip
    with local_stack(req) as (url, procs):
        client = Client(url)
        job = client.submit(req.app, cluster=req.cluster, options=req.options)
        start_workers(job, procs, url, req, 120.0)
        if sc.kill:
            KILLED.append(kill_later(job, procs, TIME_SCALE))
        st = follow(job, live=False)
        check(job, client.r)
    return st  # type: ignore[no-any-return]


def _exactly_once(job: Any, r: Any) -> None:
    """Every request committed, each exactly once (no loss, no duplicate)."""
    st = job.status()
    events = r.xrange(JobKeys(job.id).events)
    commits = [decode(f[b"key"]) for _, f in events if f.get(b"type") == b"commit"]
    assert len(commits) == len(set(commits)) == int(st["requests_total"]) == 3 * PROMPTS
    assert len(job.results()) == 3 * PROMPTS


def test_wrong_lengths_make_the_job_switch_and_nothing_is_lost(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def check(job: Any, r: Any) -> None:
        _exactly_once(job, r)
        seen["stats"] = job.stats()
        seen["spans"] = job_spans(job)
        sub = JobSubmission.model_validate_json(r.get(JobKeys(job.id).spec))
        # a restarted coordinator rebuilds the switched plan from Redis
        run = JobRun(r, None, build_job(sub, LENGTHS))
        run.load()
        assert plan_doc(run.job) == json.loads(r.get(JobKeys(job.id).plan))
        assert run.adjuster.history == job.status()["switches"]  # the next switch appends
        seen["switches"] = len(r.lrange(JobKeys(job.id).switches, 0, -1))

    st = _run(tmp_path, WRONG, check)
    assert st["status"] == "done"
    assert st.get("switches"), st.get("adjust")
    assert seen["switches"] == len(st["switches"])
    first = st["switches"][0]
    assert first["p50_after_s"] < first["p50_before_s"] - first["margin_s"] + 1e-6
    assert st["adjust"]["looks"] >= len(st["switches"])
    # the Gantt chart's actual spans mark the preempted tasks, and it draws
    planned, actual = seen["spans"]
    assert sum(s.preempted for s in actual) >= seen["stats"]["preemptions"] >= 1
    assert {s.model for s in planned} == {s.model for s in actual}
    png = draw(planned, actual, tmp_path / "gantt.png", "lengths")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_right_beliefs_do_not_switch(tmp_path: Path) -> None:
    st = _run(tmp_path, Scenario("right"), _exactly_once)
    assert st["status"] == "done"
    assert st["adjust"]["looks"] >= 2  # it looked (periodically, and as models finished)
    assert not st.get("switches"), st["switches"]
    assert "eta_p90_s" in st


def test_lost_worker_is_replanned_on_the_groups_left(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def check(job: Any, r: Any) -> None:
        _exactly_once(job, r)
        seen["stats"] = job.stats()
        seen["docs"] = [json.loads(d) for d in r.lrange(JobKeys(job.id).switches, 0, -1)]
        seen["tasks"] = [json.loads(v) for v in r.hvals(JobKeys(job.id).tasks)]

    st = _run(tmp_path, Scenario("worker-lost", kill=True), check)
    assert st["status"] == "done"
    assert seen["stats"].get("tasks_lost", 0) >= 1
    assert st["adjust"]["reasons"].get("lost worker", 0) >= 1  # the loss made the job look
    lost_at = KILLED[-1]["at"]
    # once the loss is noticed (heartbeat older than DEAD_AFTER_S), no task goes to GPU 3
    after = lost_at + DEAD_AFTER_S + 2  # unix s
    late = [t for t in seen["tasks"] if 3 in t["gpus"] and t["sent_at"] > after]
    assert not late, late
    for doc in seen["docs"]:  # nor does a re-plan made after it
        if float(st["started_at"]) + doc["at_s"] * TIME_SCALE > after:
            for a in doc["assignments"]:
                assert all(3 not in g["gpus"] for g in a["gpu_groups"]), a


def test_bench_runs_and_reports_the_gap_recovered() -> None:
    """``bench/replanning.py --quick`` (the lengths scenario: static, dynamic and oracle runs)
    ends with its figure; the value itself is the bench's (docs/replanning.md), not asserted."""
    import re
    import subprocess
    import sys

    from tests.runtime.conftest import ROOT

    argv = [sys.executable, "bench/replanning.py", "--quick", "--time-scale", "0.03"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    row = next(line for line in lines if line.startswith("lengths"))
    static, dynamic, oracle = (float(x) for x in row.split()[1:4])
    assert min(static, dynamic, oracle) > 0
    assert re.fullmatch(r"gap_recovered=(-?\d+\.\d+|nan)", lines[-1]), lines[-1]
