"""Workers on the real vLLM engine (CPU build): stage tasks from their queues, end to end.

Real parts only: a private ``redis-server``, two ``samullm worker --engine vllm --device cpu``
processes (one CPU core each, as two "devices"), stage tasks sent by name through Celery exactly as
the coordinator sends them, and two random Llamas of different sizes built locally. The tests
check progress on the stream, cooperative preemption mid-generation with the generated prefix
handed back, the continuation on the other worker at the exact total length (``ignore_eos``),
engine reuse and release as the task says, and bad models reported in the stage result while
the worker keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from coordinator.messages import (
    TASK_RUN_STAGE,
    Control,
    EngineSpec,
    GroupRef,
    ProgressEvent,
    RequestItem,
    SamplingParams,
    StageResult,
    StageTask,
    celery_config,
)
from coordinator.redis_server import RedisServer
from coordinator.store import WORKERS, JobKeys, decode
from workers.main import queue_name

pytestmark = pytest.mark.vllm_cpu
ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 120.0  # s for a worker to import vLLM and announce itself (2 busy cores)
TASK_S = 180.0  # s for one task to end
PROMPT = "the worker reports token progress to the coordinator"


@dataclass
class Workers:
    """Redis, two vLLM workers (CPU devices 0 and 1) and a Celery sender."""

    url: str
    r: redis.Redis
    celery: Celery
    procs: dict[int, subprocess.Popen[bytes]]
    logs: dict[int, Path]

    def queue(self, device: int) -> str:
        return queue_name("n0", [device])

    def log_tail(self) -> str:
        return "\n".join(f"==== gpu{d}\n{p.read_text(errors='replace')[-3000:]}"
                         for d, p in self.logs.items())  # fmt: skip


def _wait(pred: Callable[[], Any], timeout: float, what: str, w: Workers | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{w.log_tail() if w else ''}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, vllm_ready: None) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("vllm-workers")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with RedisServer.start() as server:
        r = redis.Redis.from_url(server.url, socket_timeout=30)
        procs, logs = {}, {}
        for d in (0, 1):
            logs[d] = tmp / f"worker-gpu{d}.log"
            argv = [sys.executable, "-m", "coordinator.cli", "worker", "--gpus", str(d),
                    "--node", "n0", "--engine", "vllm", "--device", "cpu",
                    "--broker", server.url, "--loglevel", "INFO"]  # fmt: skip
            with open(logs[d], "wb") as fh:
                procs[d] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        app = Celery("test-sender")
        app.conf.update(celery_config(server.url, visibility_timeout_s=3600))
        w = Workers(server.url, r, app, procs, logs)
        try:
            want = {w.queue(0), w.queue(1)}
            _wait(lambda: want <= {decode(q) for q in r.hkeys(WORKERS)}, STARTUP_S, "workers", w)
            yield w
        finally:
            for p in procs.values():
                os.killpg(p.pid, 9)
                p.wait(timeout=10)


def _task(
    w: Workers, device: int, model_dir: str, items: list[RequestItem], *,
    job: str, keep_loaded: bool = True, chat: str = "auto",
) -> StageTask:  # fmt: skip
    engine = EngineSpec(model=Path(model_dir).name, path=model_dir, tp=1, max_num_seqs=32,
                        max_num_batched_tokens=2048, max_model_len=512, block_size=128,
                        num_kv_blocks=256, chat_template=chat)  # type: ignore[arg-type]
    return StageTask(
        job_id=job, task_id=f"t-{uuid.uuid4().hex[:8]}", assignment=0, unit="u0",
        group=GroupRef(node="n0", gpus=(device,), queue=w.queue(device)), engine=engine,
        requests=tuple(items), expected=len(items), keep_loaded=keep_loaded,
        progress_every_steps=4, progress_every_ms=100, deadline_s=600,
    )  # fmt: skip


def _items(n: int, max_tokens: int, node: str = "ask") -> list[RequestItem]:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [RequestItem(key=f"{node}/{i}", node=node, request_id=str(i),
                        prompt=f"{PROMPT} {i}", prompt_tokens=12, sampling=sampling)
            for i in range(n)]  # fmt: skip


def _send(w: Workers, task: StageTask) -> None:
    w.celery.send_task(TASK_RUN_STAGE, args=[task.model_dump(mode="json")], queue=task.group.queue)


def _result(w: Workers, task: StageTask, timeout: float = TASK_S) -> StageResult:
    events = JobKeys(task.job_id).events

    def find() -> StageResult | None:
        for _, f in w.r.xrange(events):
            if decode(f.get(b"type", b"")) == "result" and decode(f[b"task"]) == task.task_id:
                return StageResult.model_validate_json(f[b"data"])
        return None

    return _wait(find, timeout, f"the result of {task.task_id}", w)


def _outputs(w: Workers, job: str) -> dict[str, dict[str, Any]]:
    return {decode(k): json.loads(v) for k, v in w.r.hgetall(JobKeys(job).out).items()}


def _progress(w: Workers, job: str, task_id: str) -> list[ProgressEvent]:
    evs = [ProgressEvent.model_validate_json(f[b"data"])
           for _, f in w.r.xrange(JobKeys(job).progress)]  # fmt: skip
    return [e for e in evs if e.task_id == task_id]


def test_task_completes_with_progress_then_engine_reused_and_released(
    workers: Workers, tiny_model_dir: str
) -> None:
    w, job = workers, "job-basic"
    first = _task(w, 0, tiny_model_dir, _items(6, 24), job=job, keep_loaded=True)
    _send(w, first)
    res = _result(w, first)
    assert res.status == "done" and res.committed == 6, res
    assert res.load_s > 0  # the first task loaded the engine
    outs = _outputs(w, job)
    assert {o["output_tokens"] for o in outs.values()} == {24}
    assert all(o["finish_reason"] == "length" and o["text"] for o in outs.values())
    events = _progress(w, job, first.task_id)
    assert events and events[-1].steps >= 24 and events[-1].step_latency_s >= 0
    assert sum(len(e.finished) for e in events) == 6

    reuse = _task(w, 0, tiny_model_dir, _items(3, 8, "again"), job=job, keep_loaded=False)
    _send(w, reuse)
    res = _result(w, reuse)
    assert res.status == "done" and res.load_s == 0.0  # kept loaded: no load
    reload = _task(w, 0, tiny_model_dir, _items(2, 8, "third"), job=job, keep_loaded=False)
    _send(w, reload)
    res = _result(w, reload)
    assert res.status == "done" and res.load_s > 0  # released after `reuse`: loaded again


def test_preempt_mid_generation_then_finish_on_other_worker(
    workers: Workers, small_model_dir: str
) -> None:
    w, job, total = workers, "job-preempt", 160
    first = _task(w, 0, small_model_dir, _items(12, total), job=job)
    _send(w, first)

    def generating() -> bool:
        ev = _progress(w, job, first.task_id)
        return bool(ev) and sum(ev[-1].tokens.values()) >= 12 * 10

    _wait(generating, TASK_S, "tokens from the first task", w)
    stop = Control(kind="preempt", task_id=first.task_id, reason="test")
    w.r.set(JobKeys(job).ctl(first.task_id), stop.to_json())
    res = _result(w, first)
    assert res.status == "stopped" and res.reason == "test", res
    prefixes = {p.key: p for p in res.unfinished}
    assert prefixes and all(0 < p.generated_tokens < total for p in prefixes.values()), res
    assert all(p.generated_text for p in prefixes.values())

    by_key = {i.key: i for i in _items(12, total)}
    resumed = [by_key[k].model_copy(update={"generated_text": p.generated_text,
                                            "generated_tokens": p.generated_tokens})
               for k, p in prefixes.items()]  # fmt: skip
    second = _task(w, 1, small_model_dir, resumed, job=job)
    _send(w, second)
    res2 = _result(w, second)
    assert res2.status == "done" and res2.committed == len(resumed), res2
    outs = _outputs(w, job)
    assert len(outs) == 12 and {o["output_tokens"] for o in outs.values()} == {total}
    for key, p in prefixes.items():
        assert outs[key]["queue"] == w.queue(1)
        assert outs[key]["text"].startswith(p.generated_text)


def test_bad_models_fail_the_task_and_the_worker_keeps_serving(
    workers: Workers, tiny_model_dir: str, tmp_path: Path
) -> None:
    w, job = workers, "job-bad"
    not_lm = tmp_path / "encoder"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    cases = [
        (str(tmp_path / "missing"), "auto", "no such folder"),
        (str(not_lm), "auto", "not a causal language model"),
        (tiny_model_dir, "required", "chat template"),
    ]
    for path, chat, why in cases:
        task = _task(w, 1, path, _items(2, 4, "bad"), job=job, chat=chat)
        _send(w, task)
        res = _result(w, task)
        assert res.status == "failed" and why in (res.error or ""), res
        assert {p.key for p in res.unfinished} == {"bad/0", "bad/1"}
    ok = _task(w, 1, tiny_model_dir, _items(2, 4, "good"), job=job)
    _send(w, ok)
    assert _result(w, ok).status == "done"
