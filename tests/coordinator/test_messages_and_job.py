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
    with pytest.raises(SpecError, match=r"datasets\.questions\.records\[3\]"):
        build_job(_submission(doc), load_settings().default_lengths)
    doc["datasets"]["questions"] = {"path": "x.jsonl", "records": [{"prompt": "a"}]}
    with pytest.raises(SpecError, match="exactly one of 'path' and 'records'"):
        build_job(_submission(doc), load_settings().default_lengths)


def test_worker_visible_devices_renumbered_inside_a_container() -> None:
    from coordinator.cli_service import visible_devices

    assert visible_devices("2,3", None) == "2,3"
    assert visible_devices("2,3", "2,3") == "0,1"  # compose device reservation of 2 and 3
    assert visible_devices("2", "all") == "2"
