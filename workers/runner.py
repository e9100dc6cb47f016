"""Run one stage task on an engine: the loop between Redis and the engine (no Celery here).

:func:`run_stage` claims the task in the ledger (a cancelled task is dropped), gets an engine
from the cache, adds the ready requests (skipping any already committed, so a redelivered task
redoes only unfinished work), then steps the engine. Between steps it reads the task's control
key (a stop order is acted on before the next step), pops requests fed by the coordinator, commits
each finished output through the ledger's fenced commit, and appends progress events every
``progress_every_steps`` steps or ``progress_every_ms``. It ends when every expected request is
committed or skipped, or when stopped; a stopped task returns its unfinished requests with the
text and tokens generated so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from coordinator.messages import (
    Control,
    Partial,
    ProgressEvent,
    RequestItem,
    RequestOutput,
    SkipItem,
    StageResult,
    StageTask,
)
from coordinator.store import COMMITTED, DUPLICATE, PROGRESS_MAXLEN, Ledger
from workers.engines.base import Engine, EngineKey, EngineRequest, StepUpdate
from workers.engines.cache import EngineCache

log = logging.getLogger(__name__)
FEED_BATCH = 256  # fed requests popped per step
IDLE_WAIT_S = 0.05  # s; blocking wait for fed requests when the engine is idle


def engine_key(task: StageTask) -> EngineKey:
    """The cache key of a task's engine."""
    e = task.engine
    return EngineKey(
        e.model, e.tp, e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len,
        e.gpu_memory_utilization, e.dtype, e.block_size, e.num_kv_blocks, e.trust_remote_code,
        e.chat_template, e.seed, e.path,
    )  # fmt: skip


def engine_request(item: RequestItem) -> EngineRequest:
    """What the engine needs of a request."""
    s = item.sampling
    return EngineRequest(
        key=item.key, prompt=item.prompt, prompt_tokens=item.prompt_tokens,
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
        ignore_eos=s.ignore_eos, generated_text=item.generated_text,
        generated_tokens=item.generated_tokens,
        messages=tuple((m.role, m.content) for m in item.messages), choices=item.choices,
        completion=item.completion,
    )  # fmt: skip


@dataclass(slots=True)
class _Run:
    """Mutable state of one task run."""

    task: StageTask
    engine: Engine
    ledger: Ledger
    queue: str
    items: dict[str, RequestItem] = field(default_factory=dict)  # added, unfinished
    left: int = 0  # expected requests not yet committed or skipped
    committed: int = 0
    duplicates: int = 0
    fenced: int = 0
    seq: int = 0  # progress events sent
    steps: int = 0  # engine steps
    tokens: dict[str, int] = field(default_factory=dict)  # key -> tokens, since last event
    finished: list[str] = field(default_factory=list)  # since last event
    lat_sum: float = 0.0  # engine s of steps since last event
    lat_n: int = 0
    last_emit: float = 0.0  # monotonic s
    last_emit_step: int = 0


def run_stage(
    task: StageTask,
    engines: EngineCache,
    ledger: Ledger,
    *,
    queue: str,
    now: Callable[[], float] = time.monotonic,
) -> StageResult:
    """Run ``task`` to its end (see module docstring) and publish its :class:`StageResult`."""
    t0 = now()
    if ledger.claim_task(task.task_id) < 0:
        return _publish(ledger, _result(task, queue, "cancelled", t0, now))
    ledger.event("started", task.task_id, queue=queue, at=repr(time.time()))
    try:
        engine, loaded = engines.get(engine_key(task))
    except Exception as e:  # noqa: BLE001 - any load failure is reported in the result
        log.exception("engine load failed for task %s", task.task_id)
        res = _result(task, queue, "failed", t0, now, error=f"engine load failed: {e}")
        res = res.model_copy(update={"unfinished": tuple(_partials_of(task.requests))})
        return _publish(ledger, res)
    run = _Run(task, engine, ledger, queue, left=task.expected, last_emit=now())
    load_s = engine.load_s if loaded else 0.0  # a reused engine cost this task no load
    try:
        _add(run, list(task.requests))
        stop = _loop(run, t0, now)
    except Exception as e:  # noqa: BLE001 - an engine error fails the task, not the worker
        log.exception("task %s failed", task.task_id)
        engines.release()
        res = _finish(run, "failed", t0, now, load_s, error=f"{type(e).__name__}: {e}")
        return _publish(ledger, res)
    status = "done" if stop is None else "stopped"
    res = _finish(run, status, t0, now, load_s, reason=stop)  # aborts need the open engine
    if not task.keep_loaded:
        engines.release()
    return _publish(ledger, res)


def _loop(run: _Run, t0: float, now: Callable[[], float]) -> str | None:
    """Step until done; the stop reason when stopped early, else None."""
    deadline = t0 + run.task.deadline_s
    while run.left > 0:
        ctl = _control(run)
        if ctl is not None:
            return ctl.reason or ctl.kind
        if now() > deadline:
            return "deadline"
        _drain_feed(run, block=not run.engine.has_unfinished_requests())
        if run.engine.has_unfinished_requests():
            _apply(run, run.engine.step())
        _maybe_progress(run, now)
    _maybe_progress(run, now, force=True)
    return None


def _control(run: _Run) -> Control | None:
    raw = run.ledger.r.get(run.ledger.keys.ctl(run.task.task_id))
    if raw is None:
        return None
    try:
        ctl = Control.model_validate_json(raw)
    except ValidationError:
        log.error("ignoring a malformed control message for task %s", run.task.task_id)
        return None
    return ctl if ctl.kind == "preempt" else None


def _drain_feed(run: _Run, *, block: bool) -> None:
    """Add requests the coordinator fed to this task since the last step."""
    key = run.ledger.keys.feed(run.task.task_id)
    raw = run.ledger.r.lpop(key, FEED_BATCH)
    if not raw and block:
        got = run.ledger.r.blpop([key], timeout=IDLE_WAIT_S)
        raw = [got[1]] if got else []
    items: list[RequestItem] = []
    for entry in raw or []:
        if b'"reason"' in entry:
            skip = SkipItem.model_validate_json(entry)
            log.info("task %s: skipping %s (%s)", run.task.task_id, skip.key, skip.reason)
            run.left -= 1
        else:
            items.append(RequestItem.model_validate_json(entry))
    _add(run, items)


def _add(run: _Run, items: list[RequestItem]) -> None:
    done = run.ledger.committed([i.key for i in items])
    for item, is_done in zip(items, done, strict=True):
        if is_done:
            run.left -= 1
            run.duplicates += 1
            continue
        run.items[item.key] = item
        run.engine.add_request(engine_request(item))


def _apply(run: _Run, updates: list[StepUpdate]) -> None:
    run.steps += 1
    run.lat_sum += run.engine.last_step_s
    run.lat_n += 1
    for u in updates:
        run.tokens[u.key] = u.tokens
    _commit(run, [u for u in updates if u.finished])


def _commit(run: _Run, finished: list[StepUpdate]) -> None:
    """Commit the step's finished outputs (one round trip; each commit fenced on its own)."""
    outs = []
    for u in finished:
        item = run.items.pop(u.key)
        outs.append(RequestOutput(
            key=u.key, node=item.node, request_id=item.request_id, text=u.text,
            prompt_tokens=item.prompt_tokens, output_tokens=u.tokens,
            finish_reason=u.finish_reason or "stop", epoch=item.epoch,
            task_id=run.task.task_id, queue=run.queue,
        ))  # fmt: skip
    for u, verdict in zip(finished, run.ledger.commit_many(outs), strict=True):
        if verdict == COMMITTED:
            run.committed += 1
        elif verdict == DUPLICATE:
            run.duplicates += 1
        else:
            run.fenced += 1
        run.left -= 1
        run.finished.append(u.key)
        run.tokens.pop(u.key, None)


def _maybe_progress(run: _Run, now: Callable[[], float], *, force: bool = False) -> None:
    t = now()
    due = (run.steps - run.last_emit_step >= run.task.progress_every_steps) or (
        (t - run.last_emit) * 1000.0 >= run.task.progress_every_ms
    )
    if not (force or due) or (run.steps == run.last_emit_step and not run.finished):
        return
    ev = ProgressEvent(
        job_id=run.task.job_id, task_id=run.task.task_id, queue=run.queue, seq=run.seq,
        engine_s=run.engine.clock_s, steps=run.steps,
        step_latency_s=run.lat_sum / run.lat_n if run.lat_n else 0.0,
        tokens=dict(run.tokens), finished=tuple(run.finished),
    )  # fmt: skip
    run.ledger.r.xadd(
        run.ledger.keys.progress, {"data": ev.to_json()}, maxlen=PROGRESS_MAXLEN, approximate=True
    )
    run.seq += 1
    run.tokens, run.finished = {}, []
    run.lat_sum, run.lat_n = 0.0, 0
    run.last_emit, run.last_emit_step = t, run.steps


def _finish(
    run: _Run,
    status: str,
    t0: float,
    now: Callable[[], float],
    load_s: float,
    *,
    error: str | None = None,
    reason: str | None = None,
) -> StageResult:
    """Abort what is left (its prefix goes back) and build the result."""
    partials = []
    for key in list(run.items):
        try:
            a = run.engine.abort_request(key)
            partials.append(Partial(key=key, generated_text=a.text, generated_tokens=a.tokens))
        except Exception:  # noqa: BLE001 - a dead engine loses the prefix, not the request
            partials.append(Partial(key=key, generated_text="", generated_tokens=0))
    partials += _partials_of(_unadded_feed(run))
    return _result(
        run.task, run.queue, status, t0, now, committed=run.committed,
        duplicates=run.duplicates, fenced=run.fenced, unfinished=tuple(partials),
        engine_s=run.engine.clock_s, load_s=load_s, error=error, reason=reason,
    )  # fmt: skip


def _unadded_feed(run: _Run) -> list[RequestItem]:
    """Requests fed but never added (a stop came first): they go back too."""
    key = run.ledger.keys.feed(run.task.task_id)
    raw = run.ledger.r.lpop(key, 1_000_000) or []
    return [RequestItem.model_validate_json(e) for e in raw if b'"reason"' not in e]


def _partials_of(items: list[RequestItem] | tuple[RequestItem, ...]) -> list[Partial]:
    return [
        Partial(key=i.key, generated_text=i.generated_text, generated_tokens=i.generated_tokens)
        for i in items
    ]


def _result(
    task: StageTask,
    queue: str,
    status: str,
    t0: float,
    now: Callable[[], float],
    **extra: object,
) -> StageResult:
    return StageResult.model_validate(
        {"job_id": task.job_id, "task_id": task.task_id, "queue": queue, "status": status,
         "committed": 0, "wall_s": now() - t0, **extra}
    )  # fmt: skip


def _publish(ledger: Ledger, res: StageResult) -> StageResult:
    """Mark the task ended (unless cancelled) and append its result event."""
    key = ledger.keys.task(res.task_id)
    if res.status != "cancelled":
        ledger.r.hset(key, "state", "ended")
    ledger.event("result", res.to_json(), task=res.task_id)
    return res
