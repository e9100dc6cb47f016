"""Wire schemas refuse unknown fields and versions; a submission is self-contained and plans the
same as the file it came from; the job model keeps chains together and knows when an engine
stays loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from apps.app_spec import self_contained
from apps.cluster_spec import SpecError, _read
from coordinator.job import build_job
from coordinator.messages import JobSubmission, RequestItem, SamplingParams, celery_config
from coordinator.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples/runtime/three_models.yaml"
CLUSTER = ROOT / "examples/clusters/a100x2.yaml"


def _item(**extra: object) -> dict[str, object]:
    return {"key": "n/1", "node": "n", "request_id": "1", "prompt_tokens": 5,
            "sampling": {"max_tokens": 8}, **extra}


def test_messages_forbid_unknown_fields_and_versions() -> None:
    assert RequestItem.model_validate(_item()).sampling == SamplingParams(max_tokens=8)
    with pytest.raises(ValidationError, match="surprise"):
        RequestItem.model_validate(_item(surprise=1))
    with pytest.raises(ValidationError, match="v"):
        RequestItem.model_validate(_item(v=2))
    item = RequestItem.model_validate(_item())
    with pytest.raises(ValidationError):
        item.prompt_tokens = 3  # type: ignore[misc]
    assert RequestItem.model_validate_json(item.to_json()) == item


def test_celery_config_refuses_pickle() -> None:
    cfg = celery_config("redis://x", visibility_timeout_s=100.0)
    assert "pickle" not in cfg["accept_content"] and cfg["task_serializer"] == "msgpack"
    assert cfg["task_acks_late"] and cfg["task_reject_on_worker_lost"]
    assert cfg["worker_prefetch_multiplier"] == 1
    assert cfg["broker_transport_options"]["visibility_timeout"] == 100.0


def _submission(doc: dict[str, object]) -> JobSubmission:
    return JobSubmission(job_id="j1", name="three", app=doc, cluster=_read(CLUSTER),
                         submitted_at=time.time())  # fmt: skip


def test_self_contained_submission_plans_like_the_file() -> None:
    doc = self_contained(APP)
    assert "path" not in json.dumps(doc["datasets"])  # inlined
    assert len(doc["datasets"]["questions"]["records"]) == 40
    job = build_job(_submission(doc), load_settings().default_lengths)
    assert len(job.reqs) == 120
    judge = [r for r in job.reqs.values() if r.node == "judge"]
    assert all(len(r.deps) == 2 for r in judge)
    assert job.estimate.p50 > 0
    parts = job.split(list(job.unit_keys[0]), 3)
    assert sorted(k for p in parts for k in p) == sorted(job.unit_keys[0])
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_inline_record_names_the_record() -> None:
    doc = self_contained(APP)
    doc["datasets"]["questions"]["records"][3] = {"id": "q3"}  # no prompt
    doc["datasets"]["questions"]["records"][5] = '{"id": "q5", "prompt": '  # not JSON
    job = build_job(_submission(doc), load_settings().default_lengths)
    why: dict[str, str] = {}
    for r in job.loaded.rejected:
        why.setdefault(r.request_id, r.reason)
    assert "questions.jsonl:6: invalid JSON" in why["line 6"]
    assert "questions.jsonl:4: needs column 'prompt_tokens' or 'prompt'" in why["q3"]
    assert len(job.reqs) == 120 - 2 * 3  # both rows gone from every node, the rest run
    doc["datasets"]["questions"] = {"path": "x.jsonl", "records": [{"prompt": "a"}]}
    with pytest.raises(SpecError, match="exactly one of 'path' and 'records'"):
        build_job(_submission(doc), load_settings().default_lengths)


def test_belief_option_plans_with_distorted_models_and_names_unknown_ones() -> None:
    from coordinator.messages import BeliefScale, JobOptions

    doc = self_contained(APP)
    plain = build_job(_submission(doc), load_settings().default_lengths)
    slow = {"lmsys/vicuna-13b-v1.5": BeliefScale(length_scale=2.0, latency_scale=1.3)}
    sub = _submission(doc).model_copy(update={"options": JobOptions(belief=slow)})
    told = build_job(sub, load_settings().default_lengths)
    info = told.loaded.graph.models["lmsys/vicuna-13b-v1.5"]
    base = plain.loaded.graph.models["lmsys/vicuna-13b-v1.5"]
    assert info.lengths.mean() > 1.8 * base.lengths.mean()
    assert told.estimate.p50 > plain.estimate.p50
    assert told.adjust and not build_job(
        _submission(doc).model_copy(update={"options": JobOptions(adjust=False)}),
        load_settings().default_lengths).adjust  # fmt: skip
    bad = _submission(doc).model_copy(
        update={"options": JobOptions(belief={"no/such-model": BeliefScale()})})  # fmt: skip
    with pytest.raises(SpecError, match=r"options.belief: models \['no/such-model'\]"):
        build_job(bad, load_settings().default_lengths)


def test_worker_visible_devices_renumbered_inside_a_container() -> None:
    from coordinator.cli_service import visible_devices

    assert visible_devices("2,3", None) == "2,3"
    assert visible_devices("2,3", "2,3") == "0,1"  # compose device reservation of 2 and 3
    assert visible_devices("2", "all") == "2"


def test_inlined_csv_and_json_rows_keep_their_file_and_line(tmp_path: Path) -> None:
    """A submission carries rows inline; their errors still name the file's own line."""
    (tmp_path / "p.csv").write_text("id,prompt_tokens\na,10\nb,ten\nc,5\n")
    (tmp_path / "q.json").write_text('[{"id": "x", "prompt": "hi"}, {"id": "y"}]')
    model = "lmsys/vicuna-13b-v1.5"
    (tmp_path / "app.yaml").write_text(
        "defaults: {sampling: {max_tokens: 16}}\n"
        f"models: [{{id: {model}}}]\n"
        "datasets: {p: {path: p.csv}, q: {path: q.json}}\n"
        f"nodes: [{{name: n, model: {model}, input: {{dataset: p}}}},\n"
        f"        {{name: m, model: {model}, input: {{dataset: q}}}}]\n"
    )
    job = build_job(_submission(self_contained(tmp_path / "app.yaml")),
                    load_settings().default_lengths)  # fmt: skip
    why = {r.request_id: r.reason for r in job.loaded.rejected}
    assert why["b"].startswith(f"{tmp_path / 'p.csv'}:3: column 'prompt_tokens'")
    assert why["y"].startswith(f"{tmp_path / 'q.json'}: [1]: needs column")


def test_unit_eta_scales_with_the_measured_latency() -> None:
    """The live ETA re-simulates the rest with the profile scaled by the measured latency."""
    import numpy as np

    from coordinator.eta import Pending, unit_remaining_s

    job = build_job(_submission(self_contained(APP)), load_settings().default_lengths)
    pend = [Pending(100 + i, i, 256) for i in range(20)]
    believed = unit_remaining_s(job, 0, 1, 1, pend, np.random.default_rng(1))
    slower = unit_remaining_s(job, 0, 1, 1, pend, np.random.default_rng(1), latency_scale=1.5)
    assert believed > 0 and slower == pytest.approx(1.5 * believed, rel=1e-9)


def test_length_fit_follows_requests_from_running_to_done() -> None:
    """The fit is redone when a running request commits (same count, different evidence)."""
    from coordinator.calibration import ModelEstimates, Seen

    job = build_job(_submission(self_contained(APP)), load_settings().default_lengths)
    model = job.units[0].model
    keys = list(job.unit_keys[0])
    est = ModelEstimates(job)
    running = Seen({}, set(), dict.fromkeys(keys, 5), lambda k: 50)
    first = est.length_fit(model, running)
    assert (first.finished, first.censored) == (0, len(keys))
    import numpy as np

    from planning.length_scale import stretched

    truth = stretched(job.loaded.graph.models[model].lengths, 2.0)
    lengths = truth.sample(np.random.default_rng(3), len(keys))
    done = Seen(dict(zip(keys, map(int, lengths), strict=True)), set(keys), {}, lambda k: 50)
    second = est.length_fit(model, done)
    assert (second.finished, second.censored) == (len(keys), 0)
    assert second.scale == pytest.approx(2.0, rel=0.25)  # outputs twice as long as believed
