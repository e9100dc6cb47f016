"""Result export: JSONL and Parquet rows (model column), OpenAI Batch output, Job.export_meta."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import redis

from coordinator.cli import main
from coordinator.client import Job
from coordinator.messages import RequestOutput
from coordinator.results import COLUMNS, CallMeta, ExportMeta, export, meta_from_doc
from coordinator.store import JobKeys


def _out(call: str, rid: str, text: str = "", tokens: int = 3) -> RequestOutput:
    return RequestOutput(key=f"{call}/{rid}", node=call, request_id=rid,
                         text=text or f"{call}:{rid}", prompt_tokens=10, output_tokens=tokens,
                         finish_reason="stop", epoch=0, task_id="t1",
                         queue="samullm.n0.gpu0")  # fmt: skip


# An ensemble (answer_a, answer_b) judged by "judge", plus a two-chunk chain "summ" (a sink).
CALLS = {
    "answer_a": CallMeta("answer_a", "llama-8b"),
    "answer_b": CallMeta("answer_b", "mistral-7b"),
    "judge": CallMeta("judge", "qwen-14b"),
    "summ.0": CallMeta("summ", "llama-8b"),
    "summ.1": CallMeta("summ", "llama-8b"),
}
OUTPUTS = [
    _out("answer_a", "q1"), _out("answer_b", "q1"), _out("answer_a", "q2"),
    _out("answer_b", "q2"), _out("judge", "q1"), _out("summ.0", "d1"), _out("summ.1", "d1"),
    _out("summ.0", "d2"),  # d2 fits one chunk: summ.0 is its last
]  # fmt: skip


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _no_part_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".part")]


# ------------------------------------------------------------------ rows
def test_jsonl_rows_carry_the_model(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    n = export("job1", OUTPUTS, path, meta=ExportMeta(calls=CALLS))
    rows = _read_jsonl(path)
    assert n == len(rows) == len(OUTPUTS)
    assert list(rows[0]) == list(COLUMNS)
    assert list(COLUMNS).index("model") == list(COLUMNS).index("node") + 1
    assert [(r["key"], r["model"]) for r in rows[:2]] == [
        ("answer_a/q1", "llama-8b"), ("answer_b/q1", "mistral-7b")]  # fmt: skip
    assert {r["job_id"] for r in rows} == {"job1"}
    _no_part_files(tmp_path)


def test_export_without_meta_still_works(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    assert export("j", OUTPUTS[:2], path) == 2  # the old call, unchanged
    assert [r["model"] for r in _read_jsonl(path)] == ["", ""]


def test_parquet_by_suffix_and_by_format(tmp_path: Path) -> None:
    for path, fmt in ((tmp_path / "a.parquet", None), (tmp_path / "b.data", "parquet")):
        assert export("job1", OUTPUTS, path, fmt=fmt, meta=ExportMeta(calls=CALLS)) == 8
        table = pq.read_table(path)
        assert table.column_names == list(COLUMNS)
        assert table.column("key").to_pylist() == [o.key for o in OUTPUTS]
        assert table.column("model").to_pylist()[4] == "qwen-14b"
    _no_part_files(tmp_path)


def test_unknown_format_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="export format: unknown 'csv'"):
        export("j", OUTPUTS, tmp_path / "x.csv", fmt="csv")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_neither_file_nor_part(tmp_path: Path) -> None:
    bad = OUTPUTS[0].model_copy(update={"text": "\ud800"})  # lone surrogate: not UTF-8
    with pytest.raises(UnicodeEncodeError):
        export("j", [OUTPUTS[1], bad], tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    export("j", OUTPUTS, path)
    export("j", OUTPUTS[:1], path)
    assert len(_read_jsonl(path)) == 1
    _no_part_files(tmp_path)


# ------------------------------------------------------------------ OpenAI Batch output
def test_openai_sinks_chain_completion_ids_and_errors(tmp_path: Path) -> None:
    meta = ExportMeta(
        calls=CALLS,
        completion_ids=frozenset({"d1"}),
        sinks=frozenset({"judge", "summ"}),
        errors=(
            ("judge", "q2", "input answer_b/q2 failed"),  # a sink: kept
            ("answer_a", "q3", "worker lost"),  # not a sink, but q3 has no line: kept last
            ("datasets.prompts", "bad1", "b.jsonl:4: body.prompt: expected a string"),
            ("summ.1", "d3", "prompt does not fit"),
            ("summ.0", "d3", "prompt does not fit"),  # same request of the same node: once
            ("judge", "q1", "late failure"),  # q1 has an output: no error line too
        ),
        rejected=frozenset({("datasets.prompts", "bad1"), ("summ.1", "d3")}),
    )
    path = tmp_path / "out.openai.jsonl"
    n = export("job1", OUTPUTS, path, fmt="openai", meta=meta)
    lines = _read_jsonl(path)
    assert n == len(lines) == 7
    ok, errs = lines[:3], lines[3:]
    assert [(x["custom_id"], x["response"]["request_id"]) for x in ok] == [
        ("q1", "judge/q1"), ("d1", "summ.1/d1"), ("d2", "summ.0/d2")]  # fmt: skip
    judge, d1, d2 = (x["response"]["body"] for x in ok)
    assert judge["object"] == "chat.completion" and judge["model"] == "qwen-14b"
    assert judge["choices"][0]["message"]["content"] == "judge:q1"
    assert d1["object"] == "text_completion" and d1["choices"][0]["text"] == "summ.1:d1"
    assert d2["object"] == "chat.completion"
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in ok)
    assert all(x["response"]["body"]["usage"]["total_tokens"] == 13 for x in ok)
    codes = [(e["custom_id"], e["error"]["code"]) for e in errs]
    assert codes == [("q2", "request_failed"), ("bad1", "invalid_request"),
                     ("d3", "invalid_request"), ("q3", "request_failed")]  # fmt: skip
    assert all(e["response"] is None for e in errs)
    assert errs[0]["error"]["message"] == "judge: input answer_b/q2 failed"
    assert errs[1]["error"]["message"].startswith("datasets.prompts: b.jsonl:4: body.prompt")
    _no_part_files(tmp_path)


def test_openai_chain_document_with_a_failed_later_chunk_is_an_error(tmp_path: Path) -> None:
    first = next(o for o in OUTPUTS if o.node == "summ.0" and o.request_id == "d2")
    meta = ExportMeta(calls=CALLS, sinks=frozenset({"summ"}),
                      errors=(("summ.1", "d2", "worker lost (3 attempts)"),))  # fmt: skip
    path = tmp_path / "chain.jsonl"
    export("job1", [first], path, fmt="openai", meta=meta)
    (line,) = _read_jsonl(path)
    assert line["custom_id"] == "d2" and line["response"] is None
    assert line["error"]["message"] == "summ.1: worker lost (3 attempts)"


def test_openai_ensemble_lines_share_custom_id(tmp_path: Path) -> None:
    meta = ExportMeta(calls=CALLS, sinks=frozenset({"answer_a", "answer_b"}))
    path = tmp_path / "ens.jsonl"
    assert export("job1", OUTPUTS, path, fmt="openai", meta=meta) == 4
    lines = _read_jsonl(path)
    q1 = [x["response"]["body"]["model"] for x in lines if x["custom_id"] == "q1"]
    assert q1 == ["llama-8b", "mistral-7b"]
    assert len({x["id"] for x in lines}) == 4  # line ids stay distinct


def test_openai_without_sinks_takes_every_node(tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    # 5 nodes' outputs; the chain's d1 gives one line (its last chunk)
    assert export("job1", OUTPUTS, path, fmt="openai", meta=ExportMeta(calls=CALLS)) == 7
    assert export("job1", OUTPUTS, path, fmt="openai") == 7  # nodes from the call names


# ------------------------------------------------------------------ export_meta
DOC = {
    "calls": {c: {"node": m.node, "model": m.model} for c, m in CALLS.items()},
    "completion_ids": ["d1"],
    "sinks": ["judge", "summ"],
    "rejected": [{"node": "summ.1", "request_id": "d3", "reason": "too long"},
                 {"node": "datasets.prompts", "request_id": "bad1", "reason": "b.jsonl:4: x"}],
}  # fmt: skip


def test_meta_from_doc() -> None:
    meta = meta_from_doc(DOC, {"judge/q2": "worker lost", "summ.0/a/b": "boom"})
    assert meta.calls == CALLS and meta.completion_ids == {"d1"}
    assert meta.sinks == {"judge", "summ"}
    assert meta.errors == (
        ("summ.1", "d3", "too long"), ("datasets.prompts", "bad1", "b.jsonl:4: x"),
        ("judge", "q2", "worker lost"), ("summ.0", "a/b", "boom"),
    )  # fmt: skip
    assert meta.rejected == {("summ.1", "d3"), ("datasets.prompts", "bad1")}
    assert meta_from_doc({}, {}) == ExportMeta()
    with pytest.raises(ValueError, match="export_meta: bad document"):
        meta_from_doc({"calls": {"x": {"model": "m"}}}, {})


@pytest.mark.integration
def test_job_export_meta_reads_the_state_hash(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = JobKeys("expjob")
    r.hset(keys.state, mapping={"status": "done", "export_meta": json.dumps(DOC)})
    r.hset(keys.failed, mapping={"judge/q2": "worker lost"})
    for o in OUTPUTS:
        r.xadd(keys.events, {"type": "commit", "data": o.to_json()})
    job = Job(r, "expjob")
    meta = job.export_meta()
    assert meta.calls["summ.1"] == CallMeta("summ", "llama-8b")
    assert meta.sinks == {"judge", "summ"} and meta.completion_ids == {"d1"}
    assert ("judge", "q2", "worker lost") in meta.errors and len(meta.errors) == 3

    n = job.export(tmp_path / "o.jsonl", fmt="openai")
    lines = _read_jsonl(tmp_path / "o.jsonl")
    assert n == len(lines) == 6  # judge q1, summ d1 and d2; errors q2, d3, bad1
    assert [x["custom_id"] for x in lines] == ["q1", "d1", "d2", "d3", "bad1", "q2"]
    assert job.export(tmp_path / "o.parquet") == len(OUTPUTS)

    empty = Job(r, "nometa")
    r.hset(empty.keys.state, "status", "done")
    assert empty.export_meta() == ExportMeta()
    r.hset(empty.keys.state, "export_meta", "[1, 2]")
    with pytest.raises(ValueError, match="job nometa: state field export_meta"):
        empty.export_meta()


@pytest.mark.integration
def test_cli_results_format(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = JobKeys("clijob")
    r.hset(keys.state, mapping={"status": "done", "export_meta": json.dumps(DOC)})
    for o in OUTPUTS:
        r.xadd(keys.events, {"type": "commit", "data": o.to_json()})
    out = tmp_path / "o.jsonl"
    assert main(["results", "clijob", "--out", str(out), "--format", "openai",
                 "--broker", redis_url]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == f"5 lines -> {out}"
    assert all("custom_id" in x for x in _read_jsonl(out))
    assert main(["results", "clijob", "--out", str(out), "--broker", redis_url]) == 0
    assert capsys.readouterr().out.strip() == f"{len(OUTPUTS)} outputs -> {out}"
    assert main(["results", "nojob", "--out", str(out), "--broker", redis_url]) == 2
    with pytest.raises(SystemExit):
        main(["results", "clijob", "--out", str(out), "--format", "csv", "--broker", redis_url])
