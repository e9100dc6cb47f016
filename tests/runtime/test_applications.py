"""Applications on the real runtime (Redis, Celery sim workers, coordinator): a route decided by
a router LLM, and a chain summary whose later chunks start while earlier ones still run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.job import build_job
from coordinator.messages import JobSubmission
from coordinator.runner import JobRun
from coordinator.store import JobKeys, decode
from tests.runtime.conftest import CLUSTER, LENGTHS, QUESTIONS, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not LENGTHS.is_file(), reason=f"no shared data at {LENGTHS}"),
]

FAST = 0.05  # real s per simulated s
VICUNA, MISTRAL, LLAMA = (
    "lmsys/vicuna-13b-v1.5", "mistralai/Mistral-7B-Instruct-v0.2", "NousResearch/Llama-2-7b-chat-hf"
)  # fmt: skip
JOB_TIMEOUT_S = 60.0  # s of wall time


def _write(tmp: Path, doc: dict[str, Any]) -> Path:
    path = tmp / "app.yaml"
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / "questions.jsonl").write_text(QUESTIONS.read_text())
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _router_app() -> dict[str, Any]:
    return {
        "name": "routed",
        "defaults": {"sampling": {"max_tokens": 128}},
        "models": [{"id": VICUNA}, {"id": MISTRAL}, {"id": LLAMA}],
        "datasets": {"questions": {"path": "data/questions.jsonl"}},
        "nodes": [
            {"name": "router", "model": LLAMA, "sampling": {"max_tokens": 8},
             "input": {"dataset": "questions",
                       "template": "Pick big or small for: {prompt}\nAnswer:"}},
            {"name": "answer", "route": {
                "dataset": "questions", "router": "router",
                "targets": {"big": VICUNA, "small": MISTRAL},
                "estimate": {"big": 0.3, "small": 0.7},
                "template": "Q: {prompt}\nA:"}},
            {"name": "final", "model": LLAMA, "sampling": {"max_tokens": 32},
             "input": {"nodes": ["answer"], "template": "Polish this answer: {answer}"}},
        ],
    }  # fmt: skip


def _wait(stack: Stack, job: Any) -> dict[str, Any]:
    try:
        return job.wait(timeout=JOB_TIMEOUT_S, poll_s=0.1)  # type: ignore[no-any-return]
    except TimeoutError as e:
        pytest.fail(f"{e}\nstatus: {job.status()}\n{stack.logs()}")


def test_router_llm_decides_each_route_at_run_time(stack: Stack, tmp_path: Path) -> None:
    for g in ("0", "1"):
        stack.worker(g, time_scale=FAST)
    stack.wait_workers("0", "1")
    stack.coordinator_thread()
    job = stack.submit(_write(tmp_path, _router_app()), CLUSTER)
    st = _wait(stack, job)
    outs = stack.outputs(job.id)
    routed = {decode(k): decode(v) for k, v in stack.r.hgetall(JobKeys(job.id).routed).items()}
    ids = [json.loads(line)["id"] for line in QUESTIONS.read_text().splitlines() if line]
    assert st["requests_failed"] == 0 and job.failed() == {}
    print("replan:", st["replan"])  # re-planned, or why not (routed models may start early)
    assert "assignments" in st["replan"] or st["replan"]["skipped"]
    chosen: dict[str, str] = {}
    for q in ids:
        label = outs[f"router/{q}"]["text"].split()[0]  # the sim router answers a label first
        assert label in ("big", "small")
        other = "small" if label == "big" else "big"
        assert f"answer.{label}/{q}" in outs, q  # the named target ran ...
        assert f"answer.{other}/{q}" not in outs  # ... the other did not, and is closed
        assert routed[f"answer.{other}/{q}"] == f"routed to {label!r} by router/{q}"
        assert f"final/{q}" in outs
        chosen[q] = label
    assert set(chosen.values()) == {"big", "small"}  # both routes used
    assert len(outs) == 3 * len(ids) and len(routed) == len(ids)
    commits = [f["key"] for _, f in stack.events(job.id) if f.get("type") == "commit"]
    assert sorted(commits) == sorted(outs)  # each key committed once
    # prompts as the workers got them: the templates filled with the row and the chosen answer
    model = build_job(JobSubmission.model_validate_json(stack.r.get(JobKeys(job.id).spec) or b""),
                      LENGTHS)  # fmt: skip
    run = JobRun(stack.r, None, model)
    run.load()
    q = ids[3]
    question = json.loads(QUESTIONS.read_text().splitlines()[3])["prompt"]
    router_item = run._item(f"router/{q}")
    assert router_item.prompt == f"Pick big or small for: {question}\nAnswer:"
    assert router_item.choices == ("big", "small")
    final = run._item(f"final/{q}")
    assert final.prompt == "Polish this answer: " + outs[f"answer.{chosen[q]}/{q}"]["text"]
    assert (
        final.prompt_tokens
        == model.reqs[f"final/{q}"].base_tokens + (outs[f"answer.{chosen[q]}/{q}"]["output_tokens"])
    )
    # the OpenAI batch export holds the sink node's outputs, one line per question
    out = tmp_path / "batch_out.jsonl"
    assert job.export(out, fmt="openai") == len(ids)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(ids)
    assert {x["response"]["body"]["model"] for x in lines} == {LLAMA}


def _docs(n: int) -> list[dict[str, str]]:
    words = "the river carried old stories past the mill and into the wide grey sea".split()  # noqa: SIM905
    size = [60 + 90 * (i % 4) for i in range(n)]  # words per document: 1 to 6 chunks
    return [
        {"id": f"d{i}", "prompt": " ".join(words[(i + k) % len(words)] for k in range(size[i]))}
        for i in range(n)
    ]


def test_chain_chunks_start_as_soon_as_their_previous_chunk_commits(
    stack: Stack, tmp_path: Path
) -> None:
    """Model-level pipelining: chunk 1 of a short first chunk's document starts (and even ends)
    before the last chunk-0 request of the stage is committed."""
    doc = {
        "name": "chain",
        "defaults": {"sampling": {"max_tokens": 200}},
        "models": [{"id": VICUNA}, {"id": LLAMA}],
        "datasets": {"docs": {"records": _docs(24)}},
        "nodes": [
            {"name": "summary", "model": VICUNA, "chain": {
                "dataset": "docs", "chunk_tokens": 64,
                "first_template": "Summarise: {chunk}",
                "template": "Summary so far: {summary}\nNext part: {chunk}\nUpdated summary:"}},
            {"name": "judge", "model": LLAMA, "sampling": {"max_tokens": 16},
             "input": {"nodes": ["summary"], "repeat": 2, "template": "Grade: {summary}"}},
        ],
    }  # fmt: skip
    for g in ("0", "1"):
        stack.worker(g, time_scale=FAST)
    stack.wait_workers("0", "1")
    stack.coordinator_thread()
    job = stack.submit(_write(tmp_path, doc), CLUSTER)
    st = _wait(stack, job)
    assert st["requests_failed"] == 0
    at = {f["key"]: int(i.split("-")[0]) for i, f in stack.events(job.id)
          if f.get("type") == "commit"}  # fmt: skip
    first_chunks = [t for k, t in at.items() if k.startswith("summary.0/")]
    later = [t for k, t in at.items() if k.startswith("summary.1/")]
    assert len(first_chunks) == 24 and later
    assert min(later) < max(first_chunks), "no chunk-1 request ended before chunk 0's stage"
    judged = {k.split("/")[1].split("#")[0] for k in at if k.startswith("judge/")}
    assert judged == {f"d{i}" for i in range(24)} and len(at) == st["outputs_committed"]


def test_job_replans_once_the_routes_are_known(stack: Stack, tmp_path: Path) -> None:
    """One GPU, so the router runs alone first; its answers split the questions evenly while
    the plan assumed 95 % for one label. When the last route is known the rest is planned
    again from the real split, the old assignments of the routed models are dropped, and the
    job finishes every request once."""
    doc = _router_app()
    doc["nodes"][1]["route"]["estimate"] = {"big": 0.95, "small": 0.05}
    app = _write(tmp_path, doc)
    cluster = tmp_path / "one.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": [
        {"name": "n0", "gpu": "A100-80GB", "num_gpus": 1, "island_size": 1}]}))  # fmt: skip
    stack.worker("0", time_scale=FAST)
    stack.wait_workers("0")
    stack.coordinator_thread()
    job = stack.submit(app, cluster)
    st = _wait(stack, job)
    rp = st["replan"]
    print(f"planned P50 {st['planned_makespan_s']:.1f} s from the estimate, re-planned P50 "
          f"{st['replanned_p50_s']:.1f} s at {rp.get('at_s', 0):.1f} s, actual "
          f"{st['actual_makespan_s']:.1f} s (simulated)")  # fmt: skip
    assert "assignments" in rp, rp  # re-planned, not skipped
    plan = job.plan()
    assert plan is not None
    units = [a["unit_name"] for a in plan["assignments"]]
    assert units[0] == "router" and {"answer.big", "answer.small", "final"} <= set(units[1:])
    assert len(rp["dropped"]) >= 3 and rp["at_s"] > 0
    assert st["replanned_p50_s"] != st["planned_makespan_s"]
    ids = [json.loads(line)["id"] for line in QUESTIONS.read_text().splitlines() if line]
    outs = stack.outputs(job.id)
    assert st["requests_failed"] == 0 and len(outs) == 3 * len(ids)
    commits = [f["key"] for _, f in stack.events(job.id) if f.get("type") == "commit"]
    assert sorted(commits) == sorted(outs)
    big = sum(1 for k in outs if k.startswith("answer.big/"))
    assert 0.25 * len(ids) < big < 0.75 * len(ids)  # the real split, not the estimate's
    # a restarted coordinator rebuilds the re-planned job from Redis without planning again
    model = build_job(JobSubmission.model_validate_json(stack.r.get(JobKeys(job.id).spec) or b""),
                      LENGTHS)  # fmt: skip
    run = JobRun(stack.r, None, model)
    run.load()
    n_old = len(model.plan.assignments)
    assert len(run.job.plan.assignments) == n_old + len(rp["assignments"])
    assert set(rp["dropped"]) <= run.launched and run.finished()
    assert run.job.estimate.p50 == pytest.approx(st["replanned_p50_s"])


def test_run_app_from_python_with_a_rule_route(tmp_path: Path) -> None:
    """``coordinator.local.run_app`` runs a file like ``samullm run``. The rule's module lives
    beside the file only: the coordinator, started elsewhere, routes by the labels the client
    computed. A bad file is refused before anything starts."""
    from apps.cluster_spec import SpecError
    from coordinator.local import run_app

    root = Path(__file__).resolve().parents[2]
    app = root / "examples" / "apps" / "routing_rule.yaml"
    out = tmp_path / "out.jsonl"
    summary = run_app(app, CLUSTER, time_scale=0.01, out=out, log_dir=tmp_path / "logs",
                      gantt=tmp_path / "gantt.png")  # fmt: skip
    assert summary["status"] == "done", summary
    assert Path(summary["gantt"]).read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["outputs_committed"] == len(rows) == summary["requests_total"] > 0
    assert {r["node"] for r in rows} == {"answer.code", "answer.chat"}
    bad = tmp_path / "bad.yaml"
    text = app.read_text().replace("routing_rule:", "no_such_rules_mod:")
    bad.write_text(text.replace("path: data/", f"path: {app.parent}/data/"))
    with pytest.raises(SpecError, match="route.rule: cannot load no_such_rules_mod"):
        run_app(bad, CLUSTER)
